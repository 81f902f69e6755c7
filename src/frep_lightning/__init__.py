"""frep-lightning: adversarially robust, extremely sparse classifiers (FReP) as Lightning callbacks."""

from __future__ import annotations

__version__ = "0.1.0"

from frep_lightning.attacks import FGSM, MIM, PGD, SignGradientAttack
from frep_lightning.ensemble import TemporalEnsemble
from frep_lightning.export import MergeReparameterization
from frep_lightning.fast import FastFReP
from frep_lightning.lwm import GradualPruning
from frep_lightning.module import FReP
from frep_lightning.monitor import RobustnessMonitor
from frep_lightning.objectives import MART, SRE, TRADES, CrossEntropyAT
from frep_lightning.pruning import RobustPruning, apply_masks_, compute_masks, sparsity_report
from frep_lightning.reparam import add_masks_, merge, merge_, reparameterize, reparameterize_
from frep_lightning.slimming import slim, slim_

__all__ = [
    "FGSM",
    "MART",
    "MIM",
    "PGD",
    "SRE",
    "TRADES",
    "CrossEntropyAT",
    "FReP",
    "FastFReP",
    "GradualPruning",
    "MergeReparameterization",
    "RobustPruning",
    "RobustnessMonitor",
    "SignGradientAttack",
    "TemporalEnsemble",
    "__version__",
    "add_masks_",
    "apply_masks_",
    "compute_masks",
    "merge",
    "merge_",
    "reparameterize",
    "reparameterize_",
    "slim",
    "slim_",
    "sparsity_report",
]
