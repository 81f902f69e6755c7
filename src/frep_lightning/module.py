"""The FReP LightningModule: any backbone, reparameterized, trained on a single-step objective.

One training step (Alg. 1 lines 3-11): clean forward -> attack (random start + one signed
step on the objective's attack loss) -> adversarial forward -> objective -> SGD. The clean
forward is done once and reused as the attack's (detached) reference, which is what the
consistency term of SRE compares against. Ensemble, pruning and merge are callbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from frep_lightning.attacks import PGD, PRECISIONS, SignGradientAttack, attack_precision, cross_entropy_loss
from frep_lightning.checks import check_choice, check_int
from frep_lightning.objectives import SRE, Objective, accuracy
from frep_lightning.reparam import reparameterize_

# The training epoch's running sums, on the device (no host sync per step), in this layout; the fast
# path's FastStep.sums uses it too. Checkpoints carry them, so a mid-epoch resume logs the same means.
SUM_LOSS, SUM_CORRECT_ADV, SUM_CORRECT_CLEAN, SUM_COUNT, SUM_NONFINITE = range(5)
EPOCH_SUMS_KEY = "frep_epoch_sums"


def sum_means(sums: Tensor) -> dict[str, float]:
    """``count``, ``nonfinite`` and (with a count) the ``loss`` / ``acc_adv`` / ``acc`` means of running
    sums in the ``SUM_*`` layout: one host sync."""
    loss, adv, clean, count, nonfinite = sums.tolist()
    out = {"count": count, "nonfinite": nonfinite}
    if count > 0:
        out.update(loss=loss / count, acc_adv=adv / count, acc=clean / count)
    return out


class FReP(pl.LightningModule):
    """Robust sparse training of ``model`` (a classifier taking [0, 1] images).

    Args:
        model: the backbone; normalisation must be inside it.
        objective: training objective (default SRE).
        attack: training attack (default FGSM with random start, eps 8/255).
        reparam_kind: ``hadamard`` (FReP), ``channel`` (FReP-CH) or ``none`` (original weights).
        reparam_init: ``random``, ``equal`` or ``ones`` (paper Sec. IV-E).
        lr, momentum, weight_decay, milestones, gamma: SGD with step decay at epoch ``milestones``.
        val_attack_steps: PGD steps for per-epoch robust validation (0 disables it).
        val_attack_precision: ``fp32`` or ``bf16``: precision the validation attack is crafted in
            (:func:`~frep_lightning.attacks.attack_precision`; accuracies are always fp32 forwards).
        seed: seed of the reparameterization init.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective | None = None,
        attack: SignGradientAttack | None = None,
        reparam_kind: str = "hadamard",
        reparam_init: str = "random",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 2e-4,
        nesterov: bool = False,
        milestones: Sequence[int] = (70, 85),
        gamma: float = 0.1,
        val_attack_steps: int = 10,
        val_attack_precision: str = "fp32",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"optim.lr={lr!r} must be > 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"optim.momentum={momentum!r} must be in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"optim.weight_decay={weight_decay!r} must be >= 0")
        if not 0 < gamma <= 1:
            raise ValueError(f"optim.gamma={gamma!r} must be in (0, 1]")
        if not isinstance(nesterov, bool) or (nesterov and momentum == 0):
            raise ValueError(f"optim.nesterov={nesterov!r} must be true or false (true needs optim.momentum > 0)")
        # strictly: a repeated epoch would multiply the LR by gamma twice there (MultiStepLR counts milestones)
        if any(b <= a for a, b in pairwise(milestones)) or any(m <= 0 for m in milestones):
            raise ValueError(f"optim.milestones={list(milestones)!r} must be strictly increasing positive epochs")
        val_attack_steps = check_int("module.val_attack_steps", val_attack_steps, 0)
        check_choice("val_attack_precision", val_attack_precision, PRECISIONS)
        self.save_hyperparameters(ignore=["model", "objective", "attack"])
        self.model = reparameterize_(model, kind=reparam_kind, init=reparam_init, seed=seed)
        self._train_sums: Tensor | None = None
        self._resumed_sums: dict[str, Any] | None = None
        self.objective = objective if objective is not None else SRE()
        self.attack = attack if attack is not None else SignGradientAttack(eps="8/255", steps=1, random_start=True)
        self.val_attack = PGD(eps=self.attack.eps, steps=val_attack_steps) if val_attack_steps else None

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits_clean = self.model(x) if self.objective.uses_clean else None
        reference = None if logits_clean is None else logits_clean.detach()
        x_adv = self.attack.perturb(self.model, x, lambda out: self.objective.attack_loss(out, reference, y))
        logits_adv = self.model(x_adv)
        loss = self.objective(logits_clean, logits_adv, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; check the data, or start a new "
                "run with a lower optim.lr"
            )
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        with torch.no_grad():
            sums = self.training_sums()
            sums[SUM_LOSS] += loss.detach() * y.numel()
            sums[SUM_CORRECT_ADV] += (logits_adv.argmax(dim=1) == y).sum()
            if reference is not None:
                sums[SUM_CORRECT_CLEAN] += (reference.argmax(dim=1) == y).sum()
            sums[SUM_COUNT] += y.numel()
        return loss

    # ---- the training epoch's means ---------------------------------------------------------
    def training_sums(self) -> Tensor:
        """This rank's running sums of the epoch (``SUM_*`` layout), made on the module's device."""
        if self._train_sums is None or self._train_sums.device != self.device:
            self._train_sums = torch.zeros(5, device=self.device)
        return self._train_sums

    def _sums_if_any(self) -> Tensor | None:
        return self._train_sums

    def _global_sums(self, sums: Tensor) -> Tensor:
        """Summed over DDP ranks (a collective: every rank calls it at the same point)."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            return trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        return sums.clone()

    def on_train_start(self) -> None:
        self._restore_epoch_sums()

    def _restore_epoch_sums(self) -> None:
        """A checkpoint saved mid-epoch carries the epoch's sums so far (over all ranks: rank 0 takes
        them, the others start from 0); one saved at an epoch end belongs to a finished epoch."""
        saved, self._resumed_sums = self._resumed_sums, None
        if saved is None or int(saved["epoch"]) != self.current_epoch or self.global_rank != 0:
            return
        sums = self.training_sums()
        sums.copy_(saved["sums"].to(device=sums.device, dtype=sums.dtype))

    def on_train_epoch_end(self) -> None:
        """Log the epoch's means over all ranks: one host sync per epoch."""
        sums = self._sums_if_any()
        if sums is None:
            return
        means = sum_means(self._global_sums(sums))
        sums.zero_()
        if means["nonfinite"] > 0:
            raise FloatingPointError(
                f"non-finite training loss in {int(means['nonfinite'])} step(s) of epoch {self.current_epoch}; "
                "check the data, or start a new run with a lower optim.lr"
            )
        if means["count"] > 0:  # equal on every rank already: sync_dist only keeps Lightning's DDP warning away
            self.log("train/loss_epoch", means["loss"], prog_bar=True, sync_dist=True)
            self.log("train/acc_adv", means["acc_adv"], sync_dist=True)
            if self.objective.uses_clean:
                self.log("train/acc", means["acc"], prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sums = self._sums_if_any()
        if sums is not None:
            checkpoint[EPOCH_SUMS_KEY] = {"epoch": self.current_epoch, "sums": self._global_sums(sums).cpu()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_sums = checkpoint.get(EPOCH_SUMS_KEY)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", accuracy(self.model(x), y), on_epoch=True, prog_bar=True, sync_dist=True)
        if self.val_attack is not None:
            with attack_precision(self.hparams.val_attack_precision, x.device):
                x_adv = self.val_attack.perturb(self.model, x, cross_entropy_loss(y))
            acc = accuracy(self.model(x_adv), y)
            self.log(f"val/pgd{self.val_attack.steps}", acc, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
