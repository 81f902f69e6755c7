"""Temporal ensemble (paper Sec. III-C, Eq. 13, Alg. 1 lines 12-13).

W_TE <- tau * W_TE + (1 - tau) * W with tau = min(tau0, n / (n + c)), where n is the number of
ensemble updates made before this one (so the first update copies the live model: tau = 0).
An update happens when the optimizer step count t satisfies t % f_e == 0; f_e starts at
``every_n_steps`` and is multiplied by ``interval_factor`` each time the learning rate drops,
read from the optimizer (the paper: 100, x10 at the LR drops of epochs 70 and 85), because
late, near-identical snapshots make the ensemble collapse onto the live model (Fig. 5).

What is averaged (``average``): by default (``factors``) the trainable tensors themselves, i.e.
the factors W1 and W2 (or M and W2), not their product: Alg. 1 averages "parameters" and merges
at the end. ``product`` averages the merged weight W = W1*W2 instead (Eq. 13 read literally) and
stores the result back as factors through the parametrization's ``right_inverse``. The two are
not the same (the mean of products is not the product of means); experiments/results holds the
comparison. Masks are never averaged: :class:`~frep_lightning.pruning.RobustPruning` writes the
same mask into both models.

BatchNorm statistics of the ensemble (``bn``):
    ``recompute`` (default): before validation and at the end of training, the ensemble's
        running statistics are re-estimated from ``bn_batches`` training batches with the
        ensemble's own weights (cumulative average, ``torch.optim.swa_utils.update_bn`` style).
        Statistics of other weights (``copy``) or averages of statistics (``average``) do not
        describe the averaged weights; averaging buffers hurt plain-weight models here.
    ``copy``: copy the live model's buffers at every update.
    ``average``: EMA of the floating-point BN buffers with the same tau.

Built on Lightning's ``WeightAveraging`` (validation swap, checkpoint layout, copy to the live
module at ``on_train_end``), but the update is our own: ``AveragedModel.update_parameters``
either averages every buffer (masks included) or none, and has no tau schedule over n.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from frep_lightning.checks import check_choice

BN_MODES = ("recompute", "copy", "average")
AVERAGE_MODES = ("factors", "product")


def ema_tau(n: int, tau0: float, c: float) -> float:
    """Decay of the (n+1)-th update: min(tau0, n / (n + c)); 0 for the first update."""
    return min(tau0, n / (n + c))


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _bn_buffers(model: nn.Module) -> list[Tensor]:
    out: list[Tensor] = []
    for m in _bn_layers(model):
        out.extend(b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None)
    return out


class TemporalEnsemble(WeightAveraging):
    """EMA of the trainable tensors with a warm-up tau and an LR-aware update interval.

    Args:
        tau0: upper bound of the decay.
        c: warm-up constant of tau = min(tau0, n / (n + c)).
        every_n_steps: initial update interval f_e in optimizer steps.
        interval_factor: f_e is multiplied by this at each learning-rate drop.
        lr_drop_ratio: a drop is the LR falling to at most this fraction of the LR in force when
            the interval last changed (a x0.1 step qualifies; a cosine decay counts each halving).
        bn: how the ensemble's BatchNorm statistics are obtained, see the module docstring.
        bn_batches: training batches used by ``bn='recompute'``.
        average: ``factors`` (EMA of W1, W2) or ``product`` (EMA of W = W1*W2), see the module docstring.

    Example::

        trainer = Trainer(callbacks=[TemporalEnsemble(tau0=0.999, c=10, every_n_steps=100)])
    """

    def __init__(
        self,
        tau0: float = 0.999,
        c: float = 10.0,
        every_n_steps: int = 100,
        interval_factor: int = 10,
        lr_drop_ratio: float = 0.5,
        bn: str = "recompute",
        bn_batches: int = 20,
        average: str = "factors",
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 < tau0 < 1.0:
            raise ValueError(f"ensemble.tau0={tau0!r} must be in (0, 1)")
        if not c > 0:
            raise ValueError(f"ensemble.c={c!r} must be > 0")
        if not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"ensemble.every_n_steps={every_n_steps!r} must be an integer > 0")
        if not isinstance(interval_factor, int) or interval_factor < 1:
            raise ValueError(f"ensemble.interval_factor={interval_factor!r} must be an integer >= 1")
        if not 0.0 < lr_drop_ratio < 1.0:
            raise ValueError(f"ensemble.lr_drop_ratio={lr_drop_ratio!r} must be in (0, 1)")
        check_choice("ensemble.bn", bn, BN_MODES)
        if not isinstance(bn_batches, int) or bn_batches <= 0:
            raise ValueError(f"ensemble.bn_batches={bn_batches!r} must be an integer > 0")
        check_choice("ensemble.average", average, AVERAGE_MODES)
        super().__init__(device=device, use_buffers=False)
        self.average = average
        self.tau0 = float(tau0)
        self.c = float(c)
        self.every_n_steps = every_n_steps
        self.interval_factor = interval_factor
        self.lr_drop_ratio = lr_drop_ratio
        self.bn = bn
        self.bn_batches = bn_batches
        self.interval = every_n_steps
        self.lr_at_interval_change: float | None = None
        self.last_tau: float | None = None
        self._bn_fresh = True  # ensemble BN stats match its weights
        self._swapped = False
        self._delta: list[Any] = [0.0, 0]  # (sum, count) of Eq. 14 over this validation epoch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Let pruning callbacks add their masks first, whatever the callback order, so that the
        averaged copy made here has exactly the live module's structure."""
        from frep_lightning.pruning import RobustPruning

        if stage == "fit":
            for cb in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(cb, RobustPruning):
                    cb.setup(trainer, pl_module, stage)
            if (
                self.bn == "recompute"
                and _bn_layers(pl_module)
                and not is_overridden("forward", pl_module, pl.LightningModule)
            ):
                raise ValueError(
                    f"TemporalEnsemble(bn='recompute') re-estimates the ensemble's BatchNorm statistics by calling "
                    f"the LightningModule on images: define forward(x) in {type(pl_module).__name__}, or use "
                    "ensemble.bn=copy"
                )
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The interval follows one learning rate: several optimizers are ambiguous, fail now."""
        if len(trainer.optimizers) > 1:
            raise ValueError(
                f"TemporalEnsemble reads learning-rate drops from one optimizer; {type(pl_module).__name__} "
                f"configures {len(trainer.optimizers)}. Use one optimizer (parameter groups for different settings)"
            )
        super().on_fit_start(trainer, pl_module)

    # -- schedule -----------------------------------------------------------------------
    @property
    def n_updates(self) -> int:
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

    def observe_lr(self, lr: float) -> None:
        """Multiply the interval when the LR has dropped enough since the last change."""
        if self.lr_at_interval_change is None:
            self.lr_at_interval_change = lr
        elif lr <= self.lr_drop_ratio * self.lr_at_interval_change:
            self.interval *= self.interval_factor
            self.lr_at_interval_change = lr
            rank_zero_info(f"TemporalEnsemble: LR dropped to {lr:g}; ensemble interval is now {self.interval} steps")

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Alg. 1 line 12: update when the 1-based step count t is a multiple of f_e."""
        return step_idx is not None and (step_idx + 1) % self.interval == 0

    # -- update -------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, pl_module: nn.Module) -> float:
        """One EMA step of the trainable tensors (and BN buffers for ``copy``/``average``)."""
        assert self._average_model is not None
        avg = self._average_model
        n = int(avg.n_averaged)
        tau = ema_tau(n, self.tau0, self.c)
        done: set[int] = set()
        if self.average == "product":
            done = self._update_products(avg.module, pl_module, tau)
        for p_avg, p in zip(avg.module.parameters(), pl_module.parameters(), strict=True):
            if id(p_avg) not in done:
                p_avg.lerp_(p.detach().to(p_avg.device), 1.0 - tau)
        if self.bn != "recompute":
            for b_avg, b in zip(_bn_buffers(avg.module), _bn_buffers(pl_module), strict=True):
                if self.bn == "average" and b.is_floating_point():
                    b_avg.lerp_(b.to(b_avg.device), 1.0 - tau)
                else:
                    b_avg.copy_(b)
        avg.n_averaged += 1
        self.last_tau = tau
        self._bn_fresh = self.bn != "recompute"
        return tau

    @staticmethod
    @torch.no_grad()
    def _update_products(avg_module: nn.Module, live: nn.Module, tau: float) -> set[int]:
        """EMA of the merged weight of every reparameterized layer, written back as factors;
        returns the ids of the factor tensors it set."""
        from frep_lightning.reparam import factors, weight_parametrization

        done: set[int] = set()
        for m_avg, m in zip(avg_module.modules(), live.modules(), strict=True):
            p_avg = weight_parametrization(m_avg)
            if p_avg is None:
                continue
            target = m_avg.weight.lerp(m.weight.detach().to(m_avg.weight.device), 1.0 - tau)
            new = p_avg.right_inverse(target)
            new = new if isinstance(new, tuple) else (new,)
            for dst, src in zip(factors(m_avg), new, strict=True):
                dst.copy_(src)
                done.add(id(dst))
        return done

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The update due at this step uses the interval in force during the step: Lightning steps an
        # epoch scheduler before this hook on the epoch's last batch, so the LR is read afterwards.
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            tau = self.update(pl_module)
            self._latest_update_step = trainer.global_step
            pl_module.log("ensemble/tau", tau, on_step=True, on_epoch=False)
            pl_module.log("ensemble/interval", float(self.interval), on_step=True, on_epoch=False)
        if trainer.optimizers:
            self.observe_lr(float(trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch-end updates are not part of the method (updates are step-based)."""

    # -- BatchNorm ----------------------------------------------------------------------
    @torch.no_grad()
    def recompute_bn(self, trainer: pl.Trainer) -> None:
        """Re-estimate the ensemble's BN running statistics on training batches."""
        assert self._average_model is not None
        model = self._average_model.module
        layers = _bn_layers(model)
        if not layers or self._bn_fresh:
            self._bn_fresh = True
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_subset_loader"):
            # a fixed, unaugmented subset: does not consume the training loader's random stream
            batch_size = getattr(datamodule, "batch_size", 128)
            loader = datamodule.train_subset_loader(self.bn_batches * batch_size, batch_size)
        else:
            loader = trainer.train_dataloader
        if loader is None:
            rank_zero_warn("TemporalEnsemble: no train dataloader to recompute BN statistics; keeping old ones")
            return
        momenta = [m.momentum for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        was_training = model.training
        model.train()
        device = next(model.parameters()).device
        for batch in itertools.islice(iter(loader), self.bn_batches):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device))
        for m, mom in zip(layers, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
        self._bn_fresh = True

    # -- validation / end of training ------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate the ensemble once it holds at least one update (before that it is the init)."""
        if self._average_model is not None and self.n_updates > 0 and trainer.state.fn == "fit":
            self.recompute_bn(trainer)
            self._swap_models(pl_module)
            self._swapped = True
            self._delta = [torch.zeros((), device=pl_module.device), 0]

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        """Eq. 14 (Fig. 5b): squared L2 distance between the softmax outputs of the ensemble (in
        ``pl_module`` while swapped) and the live model (in the averaged copy meanwhile); two extra
        forward passes per validation batch, logged per epoch as ``ensemble/delta``."""
        if not self._swapped or self._average_model is None:
            return
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        live = self._average_model.module
        was_training = live.training
        live.eval()
        with torch.no_grad():
            d = (pl_module(x).softmax(dim=1) - live(x).softmax(dim=1)).pow(2).sum(dim=1)
        live.train(was_training)
        self._delta[0] += d.sum()
        self._delta[1] += d.numel()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped and self._delta[1]:
            pl_module.log("ensemble/delta", self._delta[0] / self._delta[1], on_epoch=True, sync_dist=True)
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The ensemble is the model that is kept: copy it into the live module."""
        assert self._average_model is not None
        if self.n_updates == 0:
            rank_zero_warn(
                "TemporalEnsemble made no update during training (fewer optimizer steps than "
                f"ensemble.every_n_steps={self.every_n_steps}); keeping the live model instead of the ensemble."
            )
            return
        self.recompute_bn(trainer)
        self._copy_average_to_current(pl_module)

    # -- checkpoint ---------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """``state_dict`` holds the ensemble (the kept model), ``current_model_state`` the live one."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None and self.n_updates == 0:
            checkpoint["state_dict"] = checkpoint["current_model_state"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "latest_update_step": self._latest_update_step,
            "interval": self.interval,
            "lr_at_interval_change": self.lr_at_interval_change,
            "last_tau": self.last_tau,
            "bn_fresh": self._bn_fresh,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]
        self.interval = int(state_dict.get("interval", self.every_n_steps))
        self.lr_at_interval_change = state_dict.get("lr_at_interval_change")
        self.last_tau = state_dict.get("last_tau")
        self._bn_fresh = bool(state_dict.get("bn_fresh", True))
