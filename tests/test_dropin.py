"""The callbacks inside a user's own LightningModule: a torchvision model, the user's optimizer and
scheduler, with their own loss or with FReP's objective; the README's example, run as written;
clear errors, before any step, for setups the callbacks cannot serve.

During the runs, pruned entries are checked to be zero at every step in the live and the ensemble
model; after them, model.pt loads into an unmodified torchvision model with the target sparsity,
and the merged export equals the reparameterized ensemble on the same inputs.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import helpers
from frep_lightning import (
    SRE,
    GradualPruning,
    MergeReparameterization,
    RobustPruning,
    SignGradientAttack,
    TemporalEnsemble,
    reparameterize_,
)
from frep_lightning.reparam import iter_masked

README = Path(__file__).resolve().parents[1] / "README.md"


def quiet_trainer(tmp_path: Path, callbacks: list[pl.Callback], max_epochs: int = 3) -> pl.Trainer:
    return helpers.quiet_trainer(tmp_path, callbacks, accelerator="auto", max_epochs=max_epochs)


def random_images(n: int, size: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))


class UserModule(pl.LightningModule):
    """A user's own module: SGD + step schedule of their choice; plain cross-entropy, or FReP's
    SRE objective on an FGSM-RS example (``objective=True``)."""

    def __init__(self, reparam: str | None, objective: bool = False) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)
        if reparam is not None:
            reparameterize_(self.net, reparam)
        self.objective = SRE(lam=6.0) if objective else None
        self.attack = SignGradientAttack(eps="8/255", steps=1, random_start=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.objective is None:
            return nn.functional.cross_entropy(self(x), y)
        logits = self.net(x)
        x_adv = self.attack.perturb(self.net, x, lambda out: self.objective.attack_loss(out, logits.detach(), y))
        return self.objective(logits, self.net(x_adv), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(random_images(16), batch_size=8)


class ZeroWatch(pl.Callback):
    """Asserts after every optimizer step that pruned weights are exactly zero in both models and
    that the ensemble carries the live model's masks."""

    def __init__(self, pruning: RobustPruning, ensemble: TemporalEnsemble) -> None:
        self.pruning, self.ensemble, self.checked = pruning, ensemble, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.pruning.pruned:
            return
        avg = {n: (m, p) for n, m, p in iter_masked(self.ensemble._average_model.module)}
        with torch.no_grad():
            for name, module, p in iter_masked(pl_module):
                avg_module, avg_p = avg[name]
                assert torch.equal(avg_p.mask, p.mask), name
                kept = p.mask != 0
                assert bool(((module.weight == 0) | kept).all()), name
                assert bool(((avg_module.weight == 0) | kept).all()), name
        self.checked += 1


def check_export(path: Path, ensemble: TemporalEnsemble, mode: str, sparsity: float) -> None:
    """model.pt: a plain torchvision state_dict at the target sparsity, equal to the ensemble."""
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(torch.load(path, weights_only=True), strict=True)  # unmodified backbone
    weights = [m.weight for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if mode == "unstructured":
        zeros = sum(int((w == 0).sum()) for w in weights)
        assert abs(zeros / sum(w.numel() for w in weights) - sparsity) < 1e-3
    else:
        channels = sum(w.shape[0] for w in weights)
        live = sum(int((w.flatten(1) != 0).any(1).sum()) for w in weights)
        assert live == channels - round(sparsity * channels)
    ens = copy.deepcopy(ensemble._average_model.module.net).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert (plain.eval()(x) - ens(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("reparam", "mode", "sparsity", "objective"),
    [
        ("hadamard", "unstructured", 0.95, True),  # FReP inside the user's module
        (None, "unstructured", 0.9, False),  # "Ori": plain weights, the user's own loss
        ("channel", "structured", 0.5, False),  # FReP-CH, filter pruning
    ],
)
def test_callbacks_in_a_foreign_module(
    tmp_path: Path, reparam: str | None, mode: str, sparsity: float, objective: bool
) -> None:
    torch.manual_seed(0)
    module = UserModule(reparam, objective)
    pruning = RobustPruning(sparsity=sparsity, epoch=1, mode=mode)
    ensemble = TemporalEnsemble(every_n_steps=1, bn="recompute", bn_batches=2)
    export = MergeReparameterization(dirpath=str(tmp_path), attr="net")
    watch = ZeroWatch(pruning, ensemble)
    # ensemble listed first on purpose: masks must still exist before its averaged copy is made
    quiet_trainer(tmp_path, [ensemble, pruning, export, watch]).fit(module)
    assert pruning.pruned and watch.checked == 4  # epochs 1 and 2, 2 steps each
    assert ensemble.interval == 10  # StepLR dropped the LR after epoch 1: 1 x 10
    check_export(tmp_path / "model.pt", ensemble, mode, sparsity)


def readme_block() -> str:
    """The first python block under the README's drop-in section, unchanged."""
    text = README.read_text()
    section = text[text.index("## Using the callbacks in your own Lightning project") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_readme_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_block()
    assert "reparameterize_(torchvision.models.resnet18" in code and "trainer.fit(" in code
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    trainer: pl.Trainer = namespace["trainer"]
    assert trainer.current_epoch == 3 and trainer.global_step == 6
    pruning = next(cb for cb in trainer.callbacks if isinstance(cb, RobustPruning))  # type: ignore[attr-defined]
    ensemble = next(cb for cb in trainer.callbacks if isinstance(cb, TemporalEnsemble))  # type: ignore[attr-defined]
    assert pruning.pruned and pruning.pruned_at_step == 2
    assert ensemble.n_updates == 1 and ensemble.interval == 30  # an update at step 3, then x10 at the LR drop
    check_export(tmp_path / "out" / "model.pt", ensemble, "unstructured", 0.99)


def test_frep_module_keeps_pruned_weights_zero_every_step(tmp_path: Path) -> None:
    """The same during-run check on our own FReP module (SRE + FGSM-RS step, Hadamard factors)."""
    from frep_lightning import FReP
    from frep_lightning.models import build_model

    torch.manual_seed(0)
    module = FReP(build_model("resnet18", width=4), milestones=[2], val_attack_steps=0)
    data = DataLoader(random_images(24), batch_size=8)
    pruning = RobustPruning(sparsity=0.98, epoch=1)
    ensemble = TemporalEnsemble(every_n_steps=2, bn_batches=2)
    export = MergeReparameterization(dirpath=str(tmp_path))
    watch = ZeroWatch(pruning, ensemble)
    trainer = quiet_trainer(tmp_path, [pruning, ensemble, export, watch])
    trainer.fit(module, train_dataloaders=data, val_dataloaders=DataLoader(data.dataset, batch_size=12))
    assert watch.checked == 6 and ensemble.interval == 20
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    plain = build_model("resnet18", width=4)
    plain.load_state_dict(state, strict=True)
    weights = [m.weight for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert abs(zeros / sum(w.numel() for w in weights) - 0.98) < 1e-3


# ---- setups the callbacks cannot serve: a clear error before the first step ------------------------
class Steps(pl.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.n += 1


class SmallModule(pl.LightningModule):
    def __init__(self, net: nn.Module | None = None, optimizers: str = "sgd") -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        self.optimizers_kind = optimizers
        if optimizers == "two":
            self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        if not self.automatic_optimization:
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()
            return None
        return loss

    def configure_optimizers(self) -> Any:
        params = list(self.parameters())
        if self.optimizers_kind == "two":
            return [torch.optim.SGD(params[:2], lr=0.1), torch.optim.SGD(params[2:], lr=0.1)]
        if self.optimizers_kind == "lbfgs":
            return torch.optim.LBFGS(params, lr=0.1)
        if self.optimizers_kind == "factored":
            return Factored(params, lr=0.1)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(random_images(8, size=8), batch_size=4)


class Factored(torch.optim.Optimizer):
    """Keeps a per-row second moment (Adafactor-style): not maskable per weight."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                rows = p.grad.pow(2).reshape(p.shape[0], -1).mean(1) if p.dim() > 1 else p.grad.pow(2)
                state["row_var"] = rows if "row_var" not in state else 0.9 * state["row_var"] + 0.1 * rows
                scale = state["row_var"].sqrt().add(1e-8).reshape(-1, *([1] * (p.dim() - 1)))
                p.add_(p.grad / scale, alpha=-group["lr"])
        return loss


@pytest.mark.parametrize(
    ("module", "callbacks", "error", "match"),
    [
        (
            lambda: SmallModule(nn.Sequential(nn.BatchNorm2d(3), nn.Flatten())),
            lambda: [RobustPruning(sparsity=0.5, epoch=0)],
            ValueError,
            r"SmallModule has no Conv2d/Linear layer to prune",
        ),
        (
            lambda: SmallModule(),
            lambda: [RobustPruning(sparsity=0.5, epoch=0, include=["nothing.*"])],
            ValueError,
            r"no Conv2d/Linear layer to prune matching pruning\.include=\['nothing\.\*'\]",
        ),
        (
            lambda: SmallModule(optimizers="two"),
            lambda: [TemporalEnsemble(every_n_steps=1)],
            ValueError,
            r"TemporalEnsemble reads learning-rate drops from one optimizer; SmallModule configures 2",
        ),
        (
            lambda: SmallModule(optimizers="lbfgs"),
            lambda: [RobustPruning(sparsity=0.5, epoch=0)],
            ValueError,
            r"RobustPruning: LBFGS keeps state that cannot be masked per weight",
        ),
        (
            lambda: SmallModule(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))),
            lambda: [TemporalEnsemble(every_n_steps=1, bn="recompute")],
            ValueError,
            r"define forward\(x\) in SmallModule, or use ensemble\.bn=copy",
        ),
        (
            lambda: SmallModule(),
            lambda: [MergeReparameterization(attr="model")],
            AttributeError,
            r"MergeReparameterization\(attr='model'\): the LightningModule has no such submodule",
        ),
    ],
    ids=["no-conv", "no-match", "two-optimizers", "lbfgs", "no-forward", "no-attr"],
)
def test_incompatible_setup_fails_before_training(
    tmp_path: Path, module: Any, callbacks: Any, error: type[Exception], match: str
) -> None:
    steps = Steps()
    with pytest.raises(error, match=match):
        quiet_trainer(tmp_path, [*callbacks(), steps], max_epochs=1).fit(module())
    assert steps.n == 0


@pytest.mark.parametrize(
    "make_pruning",
    [lambda: RobustPruning(sparsity=0.5, epoch=1), lambda: GradualPruning(sparsity=0.5, epoch=1, end_epoch=2)],
    ids=["robust", "gradual"],
)
def test_optimizer_with_unmaskable_state_fails_at_pruning(tmp_path: Path, make_pruning: Any) -> None:
    """State shapes are only known once the optimizer has stepped: checked before masks change, by
    every pruning callback (they share install_masks)."""
    pruning = make_pruning()
    module = SmallModule(optimizers="factored")
    with pytest.raises(ValueError, match=r"Factored state 'row_var' has shape \(4,\) for a parameter of shape"):
        quiet_trainer(tmp_path, [pruning], max_epochs=3).fit(module)
    assert not pruning.pruned and all(bool((p.mask == 1).all()) for _, _, p in iter_masked(module))
