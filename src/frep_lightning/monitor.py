"""Catastrophic-overfitting watch for single-step adversarial training.

FGSM-style training can collapse silently: FGSM accuracy keeps rising while PGD accuracy drops to
~0 within an epoch. Each epoch this callback measures PGD accuracy of the *live* model on a fixed,
unaugmented subset of training images (``datamodule.train_subset_loader``), logs it as
``train/pgd_subset``, and warns loudly when it falls below ``collapse_ratio`` of its best value
since the pruning masks last changed a lot: a one-shot prune to 99 % drops robust accuracy too, and
that is pruning damage, not overfitting. A prune that removes less than half of the kept weights (a
step of a gradual schedule, whose masks change every epoch) does not restart the watch: the epoch is
compared with the one before it, the nearest network, so a collapse during a gradual schedule is
still caught.

The measurement is a pure function of the weights: eval mode (BatchNorm running statistics neither
used for batch statistics nor updated), the same PGD random start every epoch from the monitor's own
generator, and the global RNG streams left as they were, so that switching the monitor on or off does
not change the training run it watches.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from frep_lightning.attacks import PGD, PRECISIONS, attack_precision, cross_entropy_loss, eval_mode
from frep_lightning.checks import check_choice, check_int
from frep_lightning.reparam import kept_per_mask

RANDOM_START_SEED = 0  # the PGD random start: one fixed draw, so epochs differ only by their weights
# a prune removing at least this fraction of the kept mask entries restarts the watch (its damage is pruning's)
MAJOR_PRUNE = 0.5


def _masks_kept(module: torch.nn.Module) -> int | None:
    """Pruning-mask entries kept over the module's masked layers (None without masks)."""
    kept = kept_per_mask(module)
    return sum(kept) if kept else None


class RobustnessMonitor(Callback):
    """Args: ``n_images`` fixed training images, PGD-``steps`` at ``eps``; ``collapse_ratio``: warn
    when accuracy < ratio x best (once the best is at least ``min_best``); ``precision``: ``fp32``
    or ``bf16`` for crafting the attack (:func:`~frep_lightning.attacks.attack_precision`)."""

    def __init__(
        self,
        n_images: int = 256,
        steps: int = 10,
        eps: float | str = "8/255",
        step_size: float | str = "2/255",
        collapse_ratio: float = 0.5,
        min_best: float = 0.2,
        batch_size: int = 256,
        precision: str = "fp32",
    ) -> None:
        n_images = check_int("monitor.n_images", n_images, 1)
        batch_size = check_int("monitor.batch_size", batch_size, 1)
        if not 0 < collapse_ratio < 1:
            raise ValueError(f"monitor.collapse_ratio={collapse_ratio!r} must be in (0, 1)")
        check_choice("monitor.precision", precision, PRECISIONS)
        self.attack = PGD(eps=eps, steps=steps, step_size=step_size)
        self.precision = precision
        self.n_images, self.batch_size = n_images, batch_size
        self.collapse_ratio, self.min_best = collapse_ratio, min_best
        self.best = 0.0
        self.history: list[float] = []
        self.collapsed_epochs: list[int] = []
        self.collapsed = False  # below the threshold at the last measurement: warned already
        self.masks_kept: int | None = None  # mask entries kept at the last measurement (None: none seen)
        self._warned_no_loader = False

    def observe(self, acc: float, epoch: int, masks_changed: bool = False, removed: float = 1.0) -> bool:
        """Record one measurement; True when it looks like a collapse (every such epoch is in
        ``collapsed_epochs``), with a loud warning on the first epoch of each collapse only: a run that
        stays collapsed for 50 epochs gets one warning, not 50 that bury it. ``masks_changed``: pruning
        happened since the last measurement, removing the fraction ``removed`` of the kept entries. The best
        so far belongs to another network: at least :data:`MAJOR_PRUNE` drops it; a smaller step replaces it
        with the previous measurement (a gradual schedule prunes every epoch, and a reset at each would never
        compare two epochs)."""
        previous = self.history[-1] if self.history else 0.0
        self.history.append(acc)
        if masks_changed:
            self.best, self.collapsed = (0.0 if removed >= MAJOR_PRUNE else previous), False
        collapsed = self.best >= self.min_best and acc < self.collapse_ratio * self.best
        self.best = max(self.best, acc)
        if collapsed:
            self.collapsed_epochs.append(epoch)
        if collapsed and not self.collapsed:
            rank_zero_warn(
                f"CATASTROPHIC OVERFITTING suspected at epoch {epoch}: PGD-{self.attack.steps} accuracy on "
                f"{self.n_images} training images fell to {acc:.3f} from a best of {self.best:.3f}. Single-step "
                "robustness is no longer real; check the attack (random start, step size) and the objective."
            )
        self.collapsed = collapsed
        return collapsed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A checkpoint saved before ``masks_kept`` existed restores None: the restored masks are then the
        last seen, or a prune later in the resumed run would not reset the best and its damage would be
        reported as catastrophic overfitting (a fresh run's first prune resets a best of 0: no change)."""
        if self.masks_kept is None:
            self.masks_kept = _masks_kept(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader_fn = getattr(trainer.datamodule, "train_subset_loader", None) if trainer.datamodule else None
        if loader_fn is None:
            if not self._warned_no_loader:  # off is never silent: nobody watches for catastrophic overfitting
                rank_zero_warn(
                    "RobustnessMonitor: the trainer has no datamodule with train_subset_loader(n, batch_size); "
                    "catastrophic overfitting is NOT being watched in this run"
                )
                self._warned_no_loader = True
            return
        device = pl_module.device
        generator = torch.Generator(device=device).manual_seed(RANDOM_START_SEED)
        correct = total = 0
        # fork_rng: whatever else draws (a loader without its own generator) leaves the training streams alone
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(pl_module):
            for x, y in loader_fn(self.n_images, self.batch_size):
                x, y = x.to(device), y.to(device)
                with attack_precision(self.precision, x.device):
                    x_adv = self.attack.perturb(pl_module, x, cross_entropy_loss(y), generator=generator)
                with torch.no_grad():
                    correct += int((pl_module(x_adv).argmax(1) == y).sum())
                total += len(y)
        acc = correct / max(total, 1)
        kept = _masks_kept(pl_module)
        masks_changed = self.masks_kept is not None and kept != self.masks_kept
        removed = 1.0 - (kept or 0) / self.masks_kept if masks_changed and self.masks_kept else 1.0
        self.masks_kept = kept
        pl_module.log("train/pgd_subset", acc, on_epoch=True, sync_dist=True)  # every rank measures the same images
        self.observe(acc, trainer.current_epoch, masks_changed, removed)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "history": self.history,
            "collapsed_epochs": self.collapsed_epochs,
            "collapsed": self.collapsed,
            "masks_kept": self.masks_kept,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict["best"]
        self.history = list(state_dict["history"])
        self.collapsed_epochs = list(state_dict["collapsed_epochs"])
        self.collapsed = bool(state_dict.get("collapsed", False))  # older checkpoints: at worst one more warning
        self.masks_kept = state_dict.get("masks_kept")
