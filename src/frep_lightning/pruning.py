"""Global magnitude pruning with mask sync (paper Sec. III-D, Alg. 1 lines 15-17).

At epoch ``t_p`` the merged weights W = W1·W2 of the live model are ranked globally: by |W|
(unstructured, top-k) or by the L2 norm of each output channel (structured, Eq. 17). The same
mask is written into the live model and into every averaged copy held by a Lightning
``WeightAveraging`` callback (our ``TemporalEnsemble`` included), matched by module name.

Why not Lightning's ``ModelPruning``: it uses ``torch.nn.utils.prune``, which renames
``weight`` to ``weight_orig`` and adds parameters once pruning starts. Averaged copies made
before that no longer line up by position (the known ``EMAWeightAveraging`` + ``ModelPruning``
crash), and it never masks the averaged copy, so the exported model is silently dense. Here the
mask buffer exists from the start (see :mod:`frep_lightning.reparam`) and pruning only changes
its values.

Pruned weights stay exactly zero afterwards: the mask multiplies the product in ``forward``,
and the factor entries that only feed pruned weights are zeroed together with their optimizer
state, so neither momentum nor weight decay can revive them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning, WeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from frep_lightning.channel_removal import channel_dependents, hold_dependents, zero_dependents_
from frep_lightning.checks import check_choice, check_int, check_patterns, check_real
from frep_lightning.reparam import add_masks_, factor_masks, factors, iter_masked, mask_with_state_, select_layers

MODES = ("unstructured", "structured")


def global_magnitude_masks(weights: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Keep the ``round((1 - sparsity) * N)`` entries of largest |W| over all layers."""
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    n_keep = flat.numel() - round(sparsity * flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if n_keep > 0:
        keep[torch.topk(flat, n_keep, sorted=False).indices] = True
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start : start + w.numel()].view_as(w).to(w.dtype)
        start += w.numel()
    return masks


def global_channel_masks(weights: dict[str, Tensor], sparsity: float, min_channels: int = 1) -> dict[str, Tensor]:
    """Keep the output channels with the largest L2 norm (Eq. 17), ranked globally.

    ``min_channels`` per layer are always kept (a layer with no channel disconnects the network);
    the total number of kept channels is still exactly ``round((1 - sparsity) * D_total)`` when
    that is at least ``min_channels`` per layer.
    """
    norms = {n: w.detach().flatten(1).float().norm(dim=1) for n, w in weights.items()}
    total = sum(v.numel() for v in norms.values())
    n_keep = max(total - round(sparsity * total), min_channels * len(norms))
    keep = {n: torch.zeros_like(v, dtype=torch.bool) for n, v in norms.items()}
    for n, v in norms.items():  # guaranteed channels first
        keep[n][torch.topk(v, min(min_channels, v.numel())).indices] = True
    guaranteed = sum(int(k.sum()) for k in keep.values())
    rest = torch.cat([v.masked_fill(keep[n], -1.0) for n, v in norms.items()])
    extra = n_keep - guaranteed
    flat_keep = torch.cat(list(keep.values()))
    if extra > 0:
        flat_keep[torch.topk(rest, extra, sorted=False).indices] = True
    return channel_masks(flat_keep, weights)


def channel_masks(keep: Tensor, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weight-shaped 0/1 masks from ``keep``, one flag per output channel of every layer in turn."""
    masks, start = {}, 0
    for n, w in weights.items():
        rows = keep[start : start + w.shape[0]].to(w.dtype)
        masks[n] = rows.view(-1, *([1] * (w.dim() - 1))).expand_as(w).contiguous()
        start += w.shape[0]
    return masks


def without_classifier(
    model: nn.Module, names: Sequence[str], say: Callable[[str], None] | None = rank_zero_info
) -> list[str]:
    """``names`` less the output layer (the last Conv2d/Linear of ``model``: a Linear, or the 1x1 conv
    of a fully convolutional head): in structured pruning its output channels are the classes, and
    ranking them with the filters (Eq. 17) would remove whole classes. Its weights stay dense;
    unstructured pruning keeps it."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers or layers[-1][0] not in names:
        return list(names)
    head = layers[-1][0]
    if say is not None:
        say(f"RobustPruning: structured pruning leaves the classifier {head} dense (its rows are the classes)")
    return [n for n in names if n != head]


def compute_masks(
    model: nn.Module, sparsity: float, mode: str = "unstructured", names: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Masks for the masked layers of ``model`` (optionally only ``names``) from merged weights."""
    with torch.no_grad():
        weights = {n: m.weight.detach() for n, m, _ in iter_masked(model) if names is None or n in names}
    if not weights:
        raise ValueError("no masked Conv2d/Linear layer to prune (check pruning.include/exclude)")
    if mode == "structured":
        return global_channel_masks(weights, sparsity)
    return global_magnitude_masks(weights, sparsity)


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, Tensor], optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """Write ``masks`` into ``model``'s mask buffers by module name; zero the factor entries that
    only feed pruned weights, and the same entries of every optimizer state tensor."""
    layers = {n: (m, p) for n, m, p in iter_masked(model)}
    missing = sorted(set(masks) - set(layers))
    if missing:
        raise KeyError(f"masks name layers that are not masked in this model: {missing[:5]}")
    for name, mask in masks.items():
        module, p = layers[name]
        p.mask.copy_(mask.to(p.mask))
        for tensor, fmask in zip(factors(module), factor_masks(p, p.mask), strict=False):
            if fmask is not None:
                mask_with_state_(tensor, fmask, optimizers)


# Optimizers whose state is not per weight (L-BFGS: flattened history vectors).
UNMASKABLE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.LBFGS,)


def check_maskable_state(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Every per-parameter optimizer state tensor must be a scalar or have its parameter's shape,
    or :func:`apply_masks_` could not zero the pruned entries' state (momentum would revive them)."""
    for opt in optimizers:
        for param, state in opt.state.items():
            for key, value in state.items():
                if isinstance(value, Tensor) and value.numel() > 1 and value.shape != param.shape:
                    raise ValueError(
                        f"RobustPruning: {type(opt).__name__} state {key!r} has shape {tuple(value.shape)} for a "
                        f"parameter of shape {tuple(param.shape)}; it cannot be masked, so pruned weights would not "
                        "stay zero. Use an optimizer with per-weight state (SGD, Adam, AdamW, ...)"
                    )


def sparsity_report(model_or_state: nn.Module | dict[str, Tensor]) -> dict[str, Any]:
    """Exact-zero fraction of every Conv2d/Linear weight and globally (merged view)."""
    if isinstance(model_or_state, nn.Module):
        with torch.no_grad():
            weights = {n: m.weight.detach() for n, m in select_layers(model_or_state)}
    else:
        weights = {
            k[: -len(".weight")]: v for k, v in model_or_state.items() if k.endswith(".weight") and v.dim() in (2, 4)
        }
    layers = {}
    zeros = total = 0
    for name, w in weights.items():
        z = int((w == 0).sum())
        live = int((w.flatten(1) != 0).any(dim=1).sum())
        layers[name] = {
            "zeros": z,
            "numel": w.numel(),
            "sparsity": z / w.numel(),
            "live_channels": live,
            "channels": w.shape[0],
        }
        zeros, total = zeros + z, total + w.numel()
    return {"sparsity": zeros / max(total, 1), "zeros": zeros, "numel": total, "layers": layers}


def refuse_model_pruning(trainer: pl.Trainer, who: str) -> None:
    """Lightning's ``ModelPruning`` beside our callbacks fails late and obscurely, or prunes the wrong tensors:
    refuse it before training (see the module docstring)."""
    if any(isinstance(cb, ModelPruning) for cb in getattr(trainer, "callbacks", ())):
        raise ValueError(
            f"{who} cannot share a Trainer with Lightning's ModelPruning (torch.nn.utils.prune): it cannot prune the "
            "weights that frep reparameterizes or masks (it fails at its first pruning, or prunes only biases and "
            "BatchNorm γ/β), it renames what it prunes to weight_orig, so an averaged copy no longer lines up with "
            "the module, and it never masks the averaged copy. Remove ModelPruning: RobustPruning (one-shot) or "
            "GradualPruning (gradual) prunes the live model and the ensemble alike"
        )


def averaged_copies(trainer: pl.Trainer) -> list[nn.Module]:
    """The averaged models of all ``WeightAveraging`` callbacks (same names as the live module)."""
    copies = []
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, WeightAveraging) and cb._average_model is not None:
            copies.append(cb._average_model.module)
    return copies


class RobustPruning(Callback):
    """Prune once, at the start of epoch ``epoch``, to ``sparsity`` and keep the mask fixed.

    Args:
        sparsity: fraction of prunable weights (unstructured) or output channels (structured) removed.
        epoch: 0-based epoch at whose start the mask is computed (the paper's t_p = 30 of 100).
        mode: ``unstructured`` (global top-k |W|) or ``structured`` (global output-channel L2 norm).
        include / exclude: fnmatch patterns over module names selecting the prunable layers
            (default: every Conv2d and Linear).
        remove_channels: structured mode only: also hold at zero the bias and the directly following
            BatchNorm's γ/β of every pruned output channel (:mod:`frep_lightning.channel_removal`), so
            the channel outputs exactly 0 and the filter can be physically removed. ``False`` masks
            the filter weights only (the channel then carries the constant ReLU(β)).

    Example::

        trainer = Trainer(callbacks=[RobustPruning(sparsity=0.99, epoch=30), TemporalEnsemble()])
    """

    def __init__(
        self,
        sparsity: float,
        epoch: int = 30,
        mode: str = "unstructured",
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        remove_channels: bool = True,
    ) -> None:
        self.sparsity = check_real("pruning.sparsity", sparsity, "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        self.epoch = check_int("pruning.epoch", epoch, 0)
        check_choice("pruning.mode", mode, MODES)
        self.mode = mode
        self.include = check_patterns("pruning.include", include)
        self.exclude = check_patterns("pruning.exclude", exclude)
        if not isinstance(remove_channels, bool):
            raise ValueError(f"pruning.remove_channels={remove_channels!r} must be true or false")
        self.remove_channels = remove_channels
        self.dependents: dict[str, list[str]] = {}  # pruned layer -> BatchNorms held at zero with it
        self._hooks: list[Any] = []
        self._said: set[str] = set()  # setup runs twice per fit (TemporalEnsemble calls it first): say things once
        self.reset_state()
        self.selected_layers: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give every selected layer a mask now, before any averaged copy or optimizer exists (and, for
        validate/test/predict, before a checkpoint of a pruned run is loaded into the module)."""
        if stage == "fit" and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.epoch:
            raise ValueError(
                f"pruning.epoch={self.epoch} must be < trainer.max_epochs={trainer.max_epochs} "
                "(pruning would never run)"
            )
        selected = {n for n, _ in select_layers(pl_module, self.include, self.exclude)}
        if not selected:
            later = [h for h in ("configure_model", "setup") if is_overridden(h, pl_module, pl.LightningModule)]
            hint = (
                f" (layers made in {' / '.join(f'{h}()' for h in later)} come too late: build them in __init__)"
                if later
                else ""
            )
            raise ValueError(
                f"RobustPruning: {type(pl_module).__name__} has no Conv2d/Linear layer to prune matching "
                f"pruning.include={list(self.include)} / pruning.exclude={list(self.exclude)}{hint}"
            )
        if stage == "fit":
            refuse_model_pruning(trainer, type(self).__name__)
        add_masks_(pl_module, self.include, self.exclude)
        self.selected_layers = [n for n, _, _ in iter_masked(pl_module) if n in selected]
        if stage == "fit" and not any(bool((p.mask == 0).any()) for _, _, p in iter_masked(pl_module)):
            # An unpruned module: this callback may have pruned another one in an earlier fit (a reused callback
            # list); its "pruned" flag would skip pruning this one and export it dense. A resumed run's state is
            # restored after setup, a module already pruned (a second fit of the same one) keeps it.
            self.reset_state()
        if self.mode == "structured":
            self.selected_layers = without_classifier(pl_module, self.selected_layers, self._say_once)
        for hook in self._hooks:  # setup can run twice (TemporalEnsemble calls it first)
            hook.remove()
        self._hooks, self.dependents = [], {}
        if self.mode == "structured" and self.remove_channels:
            self.dependents = channel_dependents(pl_module, self.selected_layers)
            self._hooks = hold_dependents(pl_module, self.dependents)
            norms = sum(len(v) for v in self.dependents.values())
            self._say_once(
                f"RobustPruning: pruned channels are removed: their bias and the γ/β of {norms} BatchNorm layer(s) "
                "reading them are held at zero"
            )

    def reset_state(self) -> None:
        """Forget any earlier fit's pruning (the state that :meth:`state_dict` saves)."""
        self.pruned = False
        self.pruned_at_step: int | None = None

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            rank_zero_info(message)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Optimizers whose state cannot be masked fail now, not at the pruning epoch."""
        for opt in trainer.optimizers:
            if isinstance(opt, UNMASKABLE_OPTIMIZERS):
                raise ValueError(
                    f"RobustPruning: {type(opt).__name__} keeps state that cannot be masked per weight, so pruned "
                    "weights would not stay zero; use an optimizer with per-weight state (SGD, Adam, AdamW, ...)"
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A ``max_steps`` that ends training before the pruning epoch fails now (the epoch length is
        known only here): the run would export a dense model."""
        self.remove_restored_channels(trainer, pl_module)
        self.check_reached(trainer, self.epoch, "pruning.epoch", "pruning would never run")

    def check_reached(self, trainer: pl.Trainer, epoch: int, key: str, consequence: str) -> None:
        """Fail when ``trainer.max_steps`` ends training before the start of ``epoch`` (named ``key``); the
        epoch length is known only once training starts."""
        batches = trainer.num_training_batches
        if self.pruned or trainer.max_steps < 0 or not isinstance(batches, int) or batches == 0:
            return
        steps_before = epoch * math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        if trainer.max_steps <= steps_before:
            raise ValueError(
                f"{key}={epoch} starts after optimizer step {steps_before} ({batches} batches per epoch) but "
                f"trainer.max_steps={trainer.max_steps}: {consequence}; lower {key} or raise trainer.max_steps"
            )

    def remove_restored_channels(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Channels pruned before this fit (a checkpoint saved with ``remove_channels=false`` or before it
        existed, weights loaded by hand) may come with a nonzero bias/γ/β: the gradient hooks would freeze
        them there, neither removed nor trained. They are zeroed here, once the checkpoint is restored
        (a no-op for a run that held them at zero throughout)."""
        if not self.dependents:
            return
        found = zero_dependents_(pl_module, self.dependents, trainer.optimizers)
        for copy in averaged_copies(trainer):
            found += zero_dependents_(copy, self.dependents)
        if found:
            rank_zero_warn(
                f"RobustPruning: {found} bias/BatchNorm entries of already pruned channels were not zero (a checkpoint "
                "saved with pruning.remove_channels=false?); zeroed now, as remove_channels=true holds them"
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training that stopped before the pruning epoch (max_time, early stopping, ...) says so loudly."""
        if not self.pruned:
            masks = [p.mask for _, _, p in iter_masked(pl_module)]
            zeros, total = sum(int((m == 0).sum()) for m in masks), sum(m.numel() for m in masks)
            kept = (
                f"the masks it came with stay ({zeros / max(total, 1):.4f} of the masked weights pruned)"
                if zeros
                else "the model was NOT pruned and is dense"
            )
            rank_zero_warn(
                f"RobustPruning: training ended at epoch {trainer.current_epoch}, before pruning.epoch={self.epoch}, "
                f"so this fit did not prune: {kept}"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.pruned and trainer.current_epoch >= self.epoch:
            self.prune(trainer, pl_module)

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        masks = compute_masks(pl_module, self.sparsity, self.mode, self.selected_layers)
        masks, measured = self.install_masks(trainer, pl_module, masks)
        self.pruned = True
        self.pruned_at_step = trainer.global_step
        rank_zero_info(
            f"RobustPruning: epoch {trainer.current_epoch}, step {trainer.global_step}: {self.mode} pruning to "
            f"{self.sparsity:.4f}; measured weight sparsity {measured:.4f} over {len(masks)} layers"
        )
        return masks

    def install_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, masks: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], float]:
        """Rank 0's masks into the live model (factors, pruned channels' dependents and optimizer state
        zeroed) and every averaged copy; returns the installed masks and the measured weight sparsity
        (logged as train/sparsity)."""
        # State shapes are known only once the optimizer has stepped: checked before any mask changes.
        check_maskable_state(trainer.optimizers)
        # Ranks hold identical weights under DDP; broadcasting makes identical masks a guarantee.
        masks = trainer.strategy.broadcast(masks, src=0)
        apply_masks_(pl_module, masks, trainer.optimizers)
        zero_dependents_(pl_module, self.dependents, trainer.optimizers)
        for copy in averaged_copies(trainer):
            apply_masks_(copy, masks)
            zero_dependents_(copy, self.dependents)
        report = sparsity_report({f"{n}.weight": m.weight.detach() for n, m, _ in iter_masked(pl_module) if n in masks})
        # every rank holds rank 0's masks: sync_dist averages equal values (and keeps Lightning's DDP warning away)
        pl_module.log("train/sparsity", report["sparsity"], on_step=False, on_epoch=True, sync_dist=True)
        return masks, float(report["sparsity"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "pruned": self.pruned,
            "pruned_at_step": self.pruned_at_step,
            "sparsity": self.sparsity,
            "mode": self.mode,
            "remove_channels": self.remove_channels,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The masks themselves are buffers of the model and come back with its state_dict.
        self.pruned = bool(state_dict["pruned"])
        self.pruned_at_step = state_dict.get("pruned_at_step")
