"""LWM baseline: global magnitude pruning *during* PGD adversarial training (paper Sec. IV-A).

The paper runs LWM (Sehwag et al.) not as its original three steps (robust pre-training, prune,
fine-tune) but pruned during training, "which achieves better robustness". Here that is gradual
magnitude pruning (Zhu & Gupta 2017): at the start of every epoch ``e`` in ``[epoch, end_epoch]``
the global sparsity becomes

    s(e) = s_f * (1 - (1 - k / n)^3),   k = e - epoch + 1,  n = end_epoch - epoch + 1,

so it rises fast at first and reaches exactly ``s_f`` at ``end_epoch``; the remaining epochs
train the final sparse network. Each step ranks only the weights still alive, so masks are
monotone (a pruned weight never comes back) and every count is exact. The masks go through
:func:`frep_lightning.pruning.apply_masks_` (optimizer state zeroed, averaged copies synced),
so the method is a callback + the PGD objective + plain weights, not a separate training loop.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from frep_lightning.checks import check_int
from frep_lightning.pruning import RobustPruning, channel_masks
from frep_lightning.reparam import iter_masked


def cubic_sparsity(k: int, n: int, final: float) -> float:
    """Sparsity after the k-th of n pruning steps (k <= 0: 0, k >= n: exactly ``final``)."""
    if k <= 0:
        return 0.0
    if k >= n:
        return final
    return final * (1.0 - (1.0 - k / n) ** 3)


def _topk_keep(scores: Tensor, n_keep: int) -> Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    n_keep = min(n_keep, int(torch.isfinite(scores).sum()))  # never revive a pruned entry
    if n_keep > 0:
        keep[torch.topk(scores, n_keep, sorted=False).indices] = True
    return keep


def monotone_masks(
    weights: dict[str, Tensor], old_masks: dict[str, Tensor], sparsity: float, mode: str = "unstructured"
) -> dict[str, Tensor]:
    """Global masks at ``sparsity`` that only remove entries (or channels) alive in ``old_masks``.

    Unstructured: keep the ``round((1 - s) * N)`` live weights of largest |W|. Structured: keep
    that many output channels by L2 norm (Eq. 17), at least one per layer. Pruned entries score
    -inf, so ties with live zeros can never resurrect them.
    """
    if mode == "unstructured":
        scores = torch.cat(
            [
                torch.where(old_masks[n].bool(), w.detach().abs().float(), float("-inf")).flatten()
                for n, w in weights.items()
            ]
        )
        keep = _topk_keep(scores, scores.numel() - round(sparsity * scores.numel()))
        masks, start = {}, 0
        for n, w in weights.items():
            masks[n] = keep[start : start + w.numel()].view_as(w).to(w.dtype)
            start += w.numel()
        return masks
    if mode != "structured":
        raise ValueError(f"pruning.mode={mode!r} is not valid; allowed values: unstructured, structured")
    norms = {}
    for n, w in weights.items():
        alive = old_masks[n].flatten(1).amax(dim=1).bool()
        norms[n] = torch.where(alive, w.detach().flatten(1).float().norm(dim=1), float("-inf"))
    total = sum(v.numel() for v in norms.values())
    n_keep = max(total - round(sparsity * total), len(norms))
    guaranteed = {n: torch.zeros_like(v, dtype=torch.bool) for n, v in norms.items()}
    for n, v in norms.items():
        guaranteed[n][v.argmax()] = True  # the best live channel of every layer
    rest = torch.cat([v.masked_fill(guaranteed[n], float("-inf")) for n, v in norms.items()])
    keep = _topk_keep(rest, n_keep - len(norms)) | torch.cat(list(guaranteed.values()))
    return channel_masks(keep, weights)


class GradualPruning(RobustPruning):
    """Prune gradually from epoch ``epoch`` to ``end_epoch`` (cubic schedule) up to ``sparsity``.

    Args:
        sparsity: final fraction of prunable weights (unstructured) or output channels (structured).
        epoch: 0-based epoch at whose start the first pruning step runs.
        end_epoch: epoch at whose start the final sparsity is reached (``None``: halfway between
            ``epoch`` and ``trainer.max_epochs``, so the second half fine-tunes the sparse network).
        mode, include, exclude, remove_channels: as in :class:`~frep_lightning.pruning.RobustPruning`.

    Example::

        trainer = Trainer(max_epochs=100, callbacks=[GradualPruning(sparsity=0.99, epoch=30, end_epoch=65)])
    """

    def __init__(
        self,
        sparsity: float,
        epoch: int = 30,
        end_epoch: int | None = None,
        mode: str = "unstructured",
        include: tuple[str, ...] | list[str] = ("*",),
        exclude: tuple[str, ...] | list[str] = (),
        remove_channels: bool = True,
    ) -> None:
        super().__init__(
            sparsity=sparsity, epoch=epoch, mode=mode, include=include, exclude=exclude, remove_channels=remove_channels
        )
        if end_epoch is not None:
            try:
                end_epoch = check_int("pruning.end_epoch", end_epoch, epoch)
            except ValueError as err:
                raise ValueError(f"{err} (pruning.epoch={epoch})") from None
        self.end_epoch = end_epoch

    def reset_state(self) -> None:
        """Also the schedule's progress (``RobustPruning.__init__`` calls this to start it)."""
        super().reset_state()
        self.current_sparsity = 0.0
        self.last_epoch: int | None = None  # epoch of the latest pruning step
        self.history: list[tuple[int, float]] = []  # (epoch, target sparsity) of every step

    def final_epoch(self, max_epochs: int | None) -> int:
        """``end_epoch``, or the default halfway point between ``epoch`` and ``max_epochs``."""
        if self.end_epoch is not None:
            return self.end_epoch
        if max_epochs is None or max_epochs < 0:
            raise ValueError("pruning.end_epoch must be set when trainer.max_epochs is unlimited")
        return self.epoch + (max_epochs - self.epoch) // 2

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.end_epoch is None and (trainer.max_epochs is None or trainer.max_epochs < 0):
            self.final_epoch(trainer.max_epochs)  # raises now, not at pruning.epoch after hours of training
        if stage == "fit" and trainer.max_epochs is not None and trainer.max_epochs >= 0:
            end = self.final_epoch(trainer.max_epochs)
            if end >= trainer.max_epochs:
                raise ValueError(
                    f"pruning.end_epoch={end} must be < trainer.max_epochs={trainer.max_epochs} "
                    "(the final sparsity would never be reached)"
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Besides the first pruning step (the parent's check), a ``max_steps`` that ends training before
        the final step fails now: the run would export a model at an intermediate sparsity."""
        super().on_train_start(trainer, pl_module)
        final = f"the final sparsity {self.sparsity} would never be reached"
        self.check_reached(trainer, self.final_epoch(trainer.max_epochs), "pruning.end_epoch", final)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stopped between the first and the final step (max_time, early stopping): say which sparsity the
        model has, not the parent's "dense"."""
        if self.pruned or self.last_epoch is None:
            super().on_train_end(trainer, pl_module)
            return
        rank_zero_warn(
            f"GradualPruning: training ended at epoch {trainer.current_epoch}, before pruning.end_epoch="
            f"{self.final_epoch(trainer.max_epochs)}: the model is pruned to {self.current_sparsity:.4f}, NOT to "
            f"the target {self.sparsity:.4f}"
        )

    def target_sparsity(self, epoch: int, max_epochs: int | None = None) -> float:
        end = self.final_epoch(max_epochs)
        return cubic_sparsity(epoch - self.epoch + 1, end - self.epoch + 1, self.sparsity)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.pruned or epoch < self.epoch or (self.last_epoch is not None and epoch <= self.last_epoch):
            return
        target = self.target_sparsity(epoch, trainer.max_epochs)
        self.prune(trainer, pl_module, target)
        self.last_epoch = epoch
        self.history.append((epoch, target))
        if epoch >= self.final_epoch(trainer.max_epochs):
            self.pruned = True
            self.pruned_at_step = trainer.global_step

    def prune(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, sparsity: float | None = None
    ) -> dict[str, Tensor]:
        sparsity = self.sparsity if sparsity is None else sparsity
        layers = {n: (m, p) for n, m, p in iter_masked(pl_module) if n in self.selected_layers}
        with torch.no_grad():
            weights = {n: m.weight.detach() for n, (m, _) in layers.items()}
            old = {n: p.mask.detach() for n, (_, p) in layers.items()}
        masks, measured = self.install_masks(trainer, pl_module, monotone_masks(weights, old, sparsity, self.mode))
        self.current_sparsity = sparsity
        rank_zero_info(
            f"GradualPruning: epoch {trainer.current_epoch}: {self.mode} sparsity {sparsity:.4f} of "
            f"{self.sparsity:.4f}; measured weight sparsity {measured:.4f}"
        )
        return masks

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(current_sparsity=self.current_sparsity, last_epoch=self.last_epoch, history=list(self.history))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.current_sparsity = float(state_dict.get("current_sparsity", 0.0))
        self.last_epoch = state_dict.get("last_epoch")
        self.history = [tuple(h) for h in state_dict.get("history", [])]  # type: ignore[misc]
