"""The FReP LightningModule: any backbone, reparameterized, trained on a single-step objective.

One training step (Alg. 1 lines 3-11): clean forward -> attack (random start + one signed
step on the objective's attack loss) -> adversarial forward -> objective -> SGD. The clean
forward is done once and reused as the attack's (detached) reference, which is what the
consistency term of SRE compares against. Ensemble, pruning and merge are callbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from frep_lightning.attacks import PGD, PRECISIONS, SignGradientAttack, attack_precision, cross_entropy_loss
from frep_lightning.checks import check_choice, check_int
from frep_lightning.objectives import SRE, Objective, accuracy
from frep_lightning.reparam import reparameterize_


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
        if list(milestones) != sorted(milestones) or any(m <= 0 for m in milestones):
            raise ValueError(f"optim.milestones={list(milestones)!r} must be increasing positive epochs")
        val_attack_steps = check_int("module.val_attack_steps", val_attack_steps, 0)
        check_choice("val_attack_precision", val_attack_precision, PRECISIONS)
        self.save_hyperparameters(ignore=["model", "objective", "attack"])
        self.model = reparameterize_(model, kind=reparam_kind, init=reparam_init, seed=seed)
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
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; lower optim.lr or check the data"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc_adv", accuracy(logits_adv.detach(), y), on_step=False, on_epoch=True)
        if logits_clean is not None:
            self.log("train/acc", accuracy(reference, y), on_step=False, on_epoch=True, prog_bar=True)
        return loss

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
