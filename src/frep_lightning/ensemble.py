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
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from frep_lightning.checks import check_choice, check_int, check_real
from frep_lightning.reparam import factors, kept_per_mask, weight_parametrization

BN_MODES = ("recompute", "copy", "average")
AVERAGE_MODES = ("factors", "product")


def ema_tau(n: int, tau0: float, c: float) -> float:
    """Decay of the (n+1)-th update: min(tau0, n / (n + c)); 0 for the first update."""
    return min(tau0, n / (n + c))


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` with ``x`` on the model's device and, if floating, in its parameters' dtype (a
    ``bf16-true`` live model beside the fp32 averaged copy)."""
    p = next(model.parameters())
    return model(x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device))


def _side_loader(loader: Any) -> Any:
    """A loader over ``loader``'s dataset for side passes (BN re-estimation), so that iterating it never
    restarts the training epoch's iterator (``persistent_workers`` share one): same dataset, batch size
    and collate, in the main process; a shuffling loader's side copy shuffles with a fixed seed (resumes
    and DDP ranks see the same batches), a sequential one stays sequential; ``drop_last`` is kept."""
    if not isinstance(loader, DataLoader):
        return loader
    dataset = loader.dataset
    shuffle = not isinstance(dataset, IterableDataset) and not isinstance(loader.sampler, SequentialSampler)
    # a loader built with batch_sampler= has batch_size None: its sampler's size (BN statistics from
    # batches of 1 would be meaningless), else one batch's length
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if not batch_size and loader.batch_sampler is not None:
        batch_size = len(next(iter(loader.batch_sampler)))
    return DataLoader(
        dataset,
        batch_size=batch_size or 1,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(0) if shuffle else None,
        collate_fn=loader.collate_fn,
        num_workers=0,
        # as the user's loader: drop_last there is often what keeps a batch of one out of BatchNorm
        drop_last=bool(getattr(loader.batch_sampler, "drop_last", loader.drop_last)),
    )


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
        lr_drop_ratio: a drop is the LR falling to at most this fraction of the highest LR since
            the interval last changed (a x0.1 step qualifies; a cosine decay counts each halving; an
            LR warm-up raises the reference instead of hiding the later drops). The LR is read from the
            first parameter group of the first optimizer: with several groups, put first the group whose
            schedule marks the drops (groups that only differ in weight decay share it anyway).
        bn: how the ensemble's BatchNorm statistics are obtained, see the module docstring.
        bn_batches: training batches used by ``bn='recompute'``.
        average: ``factors`` (EMA of W1, W2) or ``product`` (EMA of W = W1*W2), see the module docstring.
        inputs: ``batch -> input tensor`` for the BN re-estimation and the Eq. 14 distance
            (default: the batch itself if it is a tensor, else its first element; dict batches need it).
        validate_live: also validate the live (SGD) model while the ensemble is swapped in: ``val_live/acc``
            and, when the LightningModule has a ``val_attack`` (FReP's), ``val_live/pgd<k>`` on the same
            images, the ensemble-vs-live robust accuracy of the paper's Fig. 5a. Costs a second validation
            attack; batches must be ``(images, labels, ...)`` sequences.

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
        inputs: Callable[[Any], Tensor] | None = None,
        validate_live: bool = False,
    ) -> None:
        self.tau0 = check_real("ensemble.tau0", tau0, "in (0, 1)", lambda v: 0.0 < v < 1.0)
        self.c = check_real("ensemble.c", c, "> 0", lambda v: v > 0)
        self.every_n_steps = check_int("ensemble.every_n_steps", every_n_steps, 1)
        self.interval_factor = check_int("ensemble.interval_factor", interval_factor, 1)
        self.lr_drop_ratio = check_real("ensemble.lr_drop_ratio", lr_drop_ratio, "in (0, 1)", lambda v: 0.0 < v < 1.0)
        check_choice("ensemble.bn", bn, BN_MODES)
        self.bn_batches = check_int("ensemble.bn_batches", bn_batches, 1)
        check_choice("ensemble.average", average, AVERAGE_MODES)
        if not isinstance(validate_live, bool):
            raise ValueError(f"ensemble.validate_live={validate_live!r} must be true or false")
        self.validate_live = validate_live
        if inputs is not None and not callable(inputs):
            raise ValueError(f"TemporalEnsemble(inputs={inputs!r}) must be a callable batch -> input tensor, or None")
        super().__init__(device=device, use_buffers=False)
        self.average = average
        self.bn = bn
        self.inputs = inputs
        self.reset_state()
        self._kept = False  # the ensemble has been copied into the module at the end of this fit
        self._delta: list[Any] = [0.0, 0]  # (sum, count) of Eq. 14 over this validation epoch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Let pruning callbacks add their masks first, whatever the callback order, so that the
        averaged copy made here has exactly the live module's structure."""
        from frep_lightning.pruning import RobustPruning, refuse_model_pruning

        if stage == "fit":
            refuse_model_pruning(trainer, "TemporalEnsemble")
            others = [
                type(cb).__name__
                for cb in trainer.callbacks  # type: ignore[attr-defined]
                if cb is not self and isinstance(cb, (WeightAveraging, StochasticWeightAveraging))
            ]
            if others:
                raise ValueError(
                    f"TemporalEnsemble cannot share a Trainer with {', '.join(others)}: each keeps its own averaged "
                    "copy and writes it into the module when training ends (model.pt would hold whichever ran last), "
                    "and WeightAveraging callbacks swap their copy in for every validation, out of order with ours, "
                    "so training would continue from the wrong weights. Use one weight-averaging callback"
                )
            self._kept = False
            self.reset_state()
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

    def reset_state(self) -> None:
        """Start the schedule over with the new averaged copy that each fit makes (a callback reused for another
        fit would otherwise skip updates up to its old step and keep its widened interval); a resumed run's
        state is restored after setup."""
        self._latest_update_step, self._latest_update_epoch = 0, -1
        self.interval = self.every_n_steps
        self.lr_at_interval_change: float | None = None
        self.last_tau: float | None = None
        self._bn_fresh = True  # ensemble BN stats match its weights
        self._bn_masks: list[int] | None = None  # mask fingerprint of the ensemble when its BN stats were made
        self._swapped = False
        self._stash: dict[int, Tensor] = {}  # fp32 ensemble tensors while swapped into a bf16 module

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
        """Multiply the interval when the LR has dropped enough below its highest value since the last change."""
        if self.lr_at_interval_change is None or lr > self.lr_at_interval_change:
            self.lr_at_interval_change = lr  # the first LR, or a warm-up / restart raising it
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
                p_avg.lerp_(p.detach().to(p_avg.device, p_avg.dtype), 1.0 - tau)
        if self.bn != "recompute":
            for b_avg, b in zip(_bn_buffers(avg.module), _bn_buffers(pl_module), strict=True):
                if self.bn == "average" and b.is_floating_point():
                    b_avg.lerp_(b.to(b_avg.device, b_avg.dtype), 1.0 - tau)
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
        done: set[int] = set()
        for m_avg, m in zip(avg_module.modules(), live.modules(), strict=True):
            p_avg = weight_parametrization(m_avg)
            if p_avg is None:
                continue
            target = m_avg.weight.lerp(m.weight.detach().to(m_avg.weight.device, m_avg.weight.dtype), 1.0 - tau)
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

    def batch_inputs(self, batch: Any) -> Tensor:
        """The input images of a batch (``inputs`` if given)."""
        if self.inputs is not None:
            return self.inputs(batch)
        x = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
        if not isinstance(x, Tensor):
            kind = "a dict" if isinstance(batch, Mapping) else f"a {type(x).__name__}"
            raise TypeError(
                f"TemporalEnsemble needs the input images of a batch and got {kind}; pass "
                "TemporalEnsemble(inputs=lambda batch: batch['image']) (your key) for batches that are not "
                "a tensor or an (images, labels, ...) sequence"
            )
        return x

    # -- BatchNorm ----------------------------------------------------------------------
    @torch.no_grad()
    def recompute_bn(self, trainer: pl.Trainer) -> None:
        """Re-estimate the ensemble's BN running statistics on training batches."""
        assert self._average_model is not None
        model = self._average_model.module
        layers = _bn_layers(model)
        masks = kept_per_mask(model)  # pruning changes the ensemble's weights without an update
        pruned_since = self.bn == "recompute" and self._bn_masks is not None and self._bn_masks != masks
        if not layers or (self._bn_fresh and not pruned_since):
            self._bn_fresh, self._bn_masks = True, masks
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_subset_loader"):
            # a fixed, unaugmented subset: does not consume the training loader's random stream
            batch_size = getattr(datamodule, "batch_size", 128)
            loader = datamodule.train_subset_loader(self.bn_batches * batch_size, batch_size)
        else:
            loader = _side_loader(trainer.train_dataloader)
        if loader is None:
            rank_zero_warn("TemporalEnsemble: no train dataloader to recompute BN statistics; keeping old ones")
            return
        momenta = [m.momentum for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        was_training = model.training
        model.train()
        # the draws of a shuffling sampler or random transforms must not shift the training random stream
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
            for batch in itertools.islice(iter(loader), self.bn_batches):
                _forward(model, self.batch_inputs(batch))
        for m, mom in zip(layers, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
        self._bn_fresh, self._bn_masks = True, masks

    # -- validation / end of training ------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate the ensemble once it holds at least one update (before that it is the init)."""
        if self._average_model is not None and self.n_updates > 0 and trainer.state.fn == "fit":
            self.recompute_bn(trainer)
            self._swap_in(pl_module)
            self._delta = [torch.zeros((), device=pl_module.device), 0]

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        """Eq. 14 (Fig. 5b): squared L2 distance between the softmax outputs of the ensemble (in
        ``pl_module`` while swapped) and the live model (in the averaged copy meanwhile); two extra
        forward passes per validation batch, logged per epoch as ``ensemble/delta``."""
        if not self._swapped or self._average_model is None:
            return
        x = self.batch_inputs(batch)
        live = self._average_model.module
        was_training = live.training
        live.eval()
        with torch.no_grad():
            live_logits = _forward(live, x).float()
            d = (_forward(pl_module, x).float().softmax(dim=1) - live_logits.softmax(dim=1)).pow(2).sum(1)
        if self.validate_live:
            self._validate_live(pl_module, live, x, batch, live_logits)
        live.train(was_training)
        self._delta[0] += d.sum()
        self._delta[1] += d.numel()

    def _validate_live(
        self, pl_module: pl.LightningModule, live: nn.Module, x: Tensor, batch: Any, logits: Tensor
    ) -> None:
        """``val_live/*``: the live model's clean and (with the module's ``val_attack``) robust accuracy on this
        validation batch, crafted and scored like the module's own ``val/*`` of the ensemble."""
        from frep_lightning.attacks import attack_precision, cross_entropy_loss

        y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        if not isinstance(y, Tensor):
            raise TypeError(
                "TemporalEnsemble(validate_live=True) (ensemble.validate_live) needs (images, labels, ...) "
                f"validation batches; got {type(batch).__name__}"
            )
        y = y.to(logits.device)
        n = len(y)
        pl_module.log(
            "val_live/acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, sync_dist=True, batch_size=n
        )
        attack = getattr(pl_module, "val_attack", None)
        if attack is None or not hasattr(attack, "perturb"):
            return
        precision = getattr(pl_module, "hparams", {}).get("val_attack_precision") or "fp32"  # as the module's val/*
        p = next(live.parameters())
        x = x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)
        with attack_precision(precision, p.device):
            x_adv = attack.perturb(live, x, cross_entropy_loss(y))
        with torch.no_grad():
            robust = (live(x_adv).float().argmax(1) == y).float().mean()
        pl_module.log(f"val_live/pgd{attack.steps}", robust, on_epoch=True, sync_dist=True, batch_size=n)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped and self._delta[1]:
            pl_module.log("ensemble/delta", self._delta[0] / self._delta[1], on_epoch=True, sync_dist=True)
        self._swap_out(pl_module)

    def _pairs(self, pl_module: nn.Module) -> list[tuple[Tensor, Tensor]]:
        assert self._average_model is not None
        avg = self._average_model.module
        return list(
            zip(
                itertools.chain(avg.parameters(), avg.buffers()),
                itertools.chain(pl_module.parameters(), pl_module.buffers()),
                strict=True,
            )
        )

    @torch.no_grad()
    def _swap_in(self, pl_module: nn.Module) -> None:
        """Put the ensemble into the module and the live weights into the averaged copy. Where the module
        is of lower precision (``bf16-true``), the fp32 ensemble is kept aside: swapping it back from the
        module would round the ensemble to bf16 at every validation."""
        for i, (a, c) in enumerate(self._pairs(pl_module)):
            if a.dtype != c.dtype:
                self._stash[i] = a.detach().clone()
            tmp = a.detach().clone()
            a.copy_(c)
            c.copy_(tmp)
        self._swapped = True

    @torch.no_grad()
    def _swap_out(self, pl_module: nn.Module) -> None:
        """Undo :meth:`_swap_in` (no-op when not swapped)."""
        if not self._swapped:
            return
        for i, (a, c) in enumerate(self._pairs(pl_module)):
            tmp = a.detach().clone()
            a.copy_(self._stash.get(i, c))
            c.copy_(tmp)
        self._stash, self._swapped = {}, False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A failure (or Ctrl-C) inside validation must not leave the ensemble in the module and the live
        weights in the averaged copy: a checkpoint written by an exception handler, or a later fit, would
        continue from swapped models."""
        self._swap_out(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.keep(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resuming a run from its final checkpoint skips the training loop, and with it
        ``on_train_end``: the ensemble must still be the model that fit leaves behind."""
        self.keep(trainer, pl_module)

    def keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The ensemble is the model that is kept: copy it into the live module (once per fit; the
        export at fit end calls it too, whatever the callback order)."""
        if self._kept or self._average_model is None:
            return
        self._kept = True
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
        """``state_dict`` holds the ensemble (the kept model), ``current_model_state`` the live one, also for a
        save inside validation (Lightning's SLURM signal handler, an exception checkpoint), when they are swapped."""
        swapped = self._swapped
        self._swap_out(pl_module)  # checkpoint["state_dict"] shares the module's storage: now the live model
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None and self.n_updates == 0:
            checkpoint["state_dict"] = checkpoint["current_model_state"]
        if swapped:  # detach the saved state from the tensors that the swap changes again
            for key in ("state_dict", "current_model_state"):
                checkpoint[key] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in checkpoint[key].items()}
            self._swap_in(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "latest_update_step": self._latest_update_step,
            "interval": self.interval,
            "lr_at_interval_change": self.lr_at_interval_change,
            "last_tau": self.last_tau,
            "bn_fresh": self._bn_fresh,
            "bn_masks": self._bn_masks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = state_dict["latest_update_step"]
        self.interval = int(state_dict.get("interval", self.every_n_steps))
        self.lr_at_interval_change = state_dict.get("lr_at_interval_change")
        self.last_tau = state_dict.get("last_tau")
        self._bn_fresh = bool(state_dict.get("bn_fresh", True))
        self._bn_masks = state_dict.get("bn_masks")
