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
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelPruning, StochasticWeightAveraging
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
    else:  # filters only: the classifier's rows are the classes and stay
        assert bool((plain.fc.weight != 0).any(1).all())
        convs = weights[:-1]
        channels = sum(w.shape[0] for w in convs)
        live = sum(int((w.flatten(1) != 0).any(1).sum()) for w in convs)
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
            r"MergeReparameterization\(attr='model'\): in the LightningModule that is no such attribute",
        ),
        (
            lambda: SmallModule(),
            lambda: [TemporalEnsemble(every_n_steps=1), EMAWeightAveraging(decay=0.9)],
            ValueError,
            r"TemporalEnsemble cannot share a Trainer with EMAWeightAveraging: .* Use one weight-averaging callback",
        ),
        (
            lambda: SmallModule(),
            lambda: [StochasticWeightAveraging(swa_lrs=0.01), TemporalEnsemble(every_n_steps=1)],
            ValueError,
            r"TemporalEnsemble cannot share a Trainer with StochasticWeightAveraging",
        ),
        (
            lambda: SmallModule(),
            lambda: [ModelPruning("l1_unstructured", amount=0.5), RobustPruning(0.5, epoch=0)],
            ValueError,
            r"RobustPruning cannot share a Trainer with Lightning's ModelPruning",
        ),
        (
            lambda: SmallModule(),
            lambda: [RobustPruning(0.5, epoch=0), ModelPruning("l1_unstructured", amount=0.5)],
            ValueError,
            r"RobustPruning cannot share a Trainer with Lightning's ModelPruning",
        ),
        (
            lambda: SmallModule(),
            lambda: [ModelPruning("l1_unstructured", amount=0.5), TemporalEnsemble(every_n_steps=1)],
            ValueError,
            r"TemporalEnsemble cannot share a Trainer with Lightning's ModelPruning",
        ),
    ],
    ids=[
        "no-conv",
        "no-match",
        "two-optimizers",
        "lbfgs",
        "no-forward",
        "no-attr",
        "ema-beside-ensemble",  # validation swaps out of order: the live weights came back wrong
        "swa-beside-ensemble",  # both write the module at train end: model.pt was whichever ran last
        "model-pruning-first",  # failed after the first epoch (weight_orig is not a Parameter)
        "model-pruning-after",  # pruned biases and BatchNorm γ/β only, silently
        "model-pruning-ensemble",  # zip() argument 2 is longer than argument 1, after the first epoch
    ],
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


def test_a_reused_callback_list_prunes_and_averages_every_new_module(tmp_path: Path) -> None:
    """One callback list for several fits (a seed loop, a notebook re-run): the second module used to be
    exported dense without a word (the pruned flag stayed set) and its ensemble never updated (the last update
    step stayed at the first fit's)."""
    pruning, ensemble = RobustPruning(sparsity=0.5, epoch=1), TemporalEnsemble(every_n_steps=1)
    callbacks = [pruning, ensemble, MergeReparameterization(dirpath=str(tmp_path), attr="net")]
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = SmallModule()
        quiet_trainer(tmp_path, callbacks, max_epochs=2).fit(module)
        assert pruning.pruned and pruning.pruned_at_step == 2 and ensemble.n_updates == 4
        plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
        weights = [plain[0].weight, plain[2].weight]
        assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * sum(w.numel() for w in weights))


def test_a_second_fit_of_a_pruned_module_keeps_its_pruning(tmp_path: Path) -> None:
    module, pruning = SmallModule(), RobustPruning(sparsity=0.5, epoch=1)
    quiet_trainer(tmp_path, [pruning], max_epochs=2).fit(module)
    masks = [p.mask.clone() for _, _, p in iter_masked(module)]
    quiet_trainer(tmp_path, [pruning], max_epochs=2).fit(module)  # fine-tuning the pruned module further
    assert pruning.pruned
    assert all(torch.equal(a, p.mask) for a, (_, _, p) in zip(masks, iter_masked(module), strict=True))


# ---- what a user's own project brings: training limits, model building, loaders, schedules, dtypes ----
def test_max_steps_before_the_pruning_epoch_fails_before_training(tmp_path: Path) -> None:
    steps = Steps()  # 2 batches per epoch: pruning at epoch 2 starts after step 4
    trainer = helpers.quiet_trainer(tmp_path, [RobustPruning(sparsity=0.5, epoch=2), steps], max_epochs=-1, max_steps=4)
    with pytest.raises(ValueError, match=r"pruning\.epoch=2 starts after optimizer step 4 .* trainer\.max_steps=4"):
        trainer.fit(SmallModule())
    assert steps.n == 0


def test_training_stopped_before_pruning_says_what_the_model_keeps(tmp_path: Path) -> None:
    class StopNow(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = True  # early stopping, max_time, ... before epoch 2

    pruning = RobustPruning(sparsity=0.5, epoch=2)
    module = SmallModule()
    with pytest.warns(UserWarning, match=r"epoch=2, so this fit did not prune: the model was NOT pruned"):
        quiet_trainer(tmp_path, [pruning, StopNow()], max_epochs=4).fit(module)
    assert not pruning.pruned
    # a new callback fine-tuning an already pruned module: its masks stay, and the warning does not call it dense
    masks = [p.mask for _, _, p in iter_masked(module)]
    for m in masks:
        m.view(-1)[: m.numel() // 2] = 0
    share = sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)
    with pytest.warns(UserWarning, match=rf"did not prune: the masks it came with stay \({share:.4f} of the masked"):
        quiet_trainer(tmp_path, [RobustPruning(sparsity=0.5, epoch=2), StopNow()], max_epochs=4).fit(module)


class LateNet(SmallModule):
    """Builds (``configure_model``) or reparameterizes (``setup``) its network after the callbacks' setup."""

    def __init__(self, late: str) -> None:
        super().__init__(net=nn.Identity() if late == "configure_model" else None)
        self.late = late

    def configure_model(self) -> None:
        if self.late == "configure_model" and isinstance(self.net, nn.Identity):
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))

    def setup(self, stage: str) -> None:
        if self.late == "setup":
            reparameterize_(self.net, "hadamard")


def test_a_model_built_or_reparameterized_too_late_fails_naming_where_to_do_it(tmp_path: Path) -> None:
    steps = Steps()
    with pytest.raises(ValueError, match=r"layers made in configure_model\(\) / setup\(\) come too late.*__init__"):
        quiet_trainer(tmp_path, [RobustPruning(0.5, epoch=0), steps], max_epochs=1).fit(LateNet("configure_model"))
    with pytest.raises(ValueError, match=r"already carry another frep parametrization: 0 \(Plain\).*__init__"):
        quiet_trainer(tmp_path, [RobustPruning(0.5, epoch=0), steps], max_epochs=1).fit(LateNet("setup"))
    assert steps.n == 0


def test_arguments_accept_numpy_numbers_and_one_pattern_string() -> None:
    import numpy as np

    pruning = RobustPruning(sparsity=np.float32(0.5), epoch=np.int64(1), include="net.*", exclude="net.2")
    assert (pruning.sparsity, pruning.epoch, pruning.include, pruning.exclude) == (0.5, 1, ("net.*",), ("net.2",))
    assert type(pruning.epoch) is int
    ens = TemporalEnsemble(tau0=np.float64(0.99), every_n_steps=np.int32(3))
    assert (ens.tau0, ens.every_n_steps) == (0.99, 3)
    for bad, key in (({"every_n_steps": True}, "ensemble.every_n_steps"), ({"c": "10"}, "ensemble.c")):
        with pytest.raises(ValueError, match=key):
            TemporalEnsemble(**bad)
    with pytest.raises(ValueError, match=r"pruning\.include=\[3\] must be a pattern or a list of patterns"):
        RobustPruning(0.5, include=[3])
    module = SmallModule()
    RobustPruning(0.5, epoch=0, exclude="net.2").setup(helpers.quiet_trainer(".", max_epochs=2), module, "fit")
    assert [n for n, _, _ in iter_masked(module)] == ["net.0"]  # "net.2" is one pattern, not 5 characters


def test_integer_arguments_take_numpy_integers_and_refuse_bools_naming_the_key(tmp_path: Path) -> None:
    import numpy as np

    from frep_lightning.attacks import PGD
    from frep_lightning.checkpointing import LastCheckpoint
    from frep_lightning.evaluate import SquareEval, WhiteBoxAttack
    from frep_lightning.lwm import GradualPruning
    from frep_lightning.monitor import RobustnessMonitor

    made = {
        "attack.steps": lambda v: PGD(steps=v).steps,
        "checkpoint.every_n_train_steps": lambda v: LastCheckpoint(tmp_path, v)._every_n_train_steps,
        "restarts": lambda v: WhiteBoxAttack(PGD(steps=2), restarts=v).restarts,
        "queries": lambda v: SquareEval(queries=v).queries,
        "pruning.end_epoch": lambda v: GradualPruning(0.5, epoch=1, end_epoch=v).end_epoch,
        "monitor.n_images": lambda v: RobustnessMonitor(n_images=v).n_images,
    }
    for key, make in made.items():
        value = make(np.int64(3))
        assert value == 3 and type(value) is int, key
        with pytest.raises(ValueError, match=rf"{re.escape(key)}=True must be an integer >= "):
            make(True)
        with pytest.raises(ValueError, match=rf"{re.escape(key)}=0 must be an integer >= "):
            make(0)
    with pytest.raises(ValueError, match=r"pruning\.end_epoch=0 must be an integer >= 1 \(pruning\.epoch=1\)"):
        GradualPruning(0.5, epoch=1, end_epoch=0)


class Seen(pl.Callback):
    """The training batches (their sums) in the order the steps saw them."""

    def __init__(self) -> None:
        self.sums: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.sums.append(round(float(batch[0].sum()), 4))


class BNModule(SmallModule):
    """BatchNorm, a validation loop, and a training loader of the user's choosing."""

    def __init__(self, loader: Any) -> None:
        super().__init__(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)))
        self.loader = loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def train_dataloader(self) -> Any:
        return self.loader(True)

    def val_dataloader(self) -> Any:
        return self.loader(False)


def test_mid_epoch_validation_with_persistent_workers_trains_on_every_batch(tmp_path: Path) -> None:
    """The ensemble's BN re-estimation before a mid-epoch validation used to restart the epoch's
    persistent-worker iterator: training silently repeated its first batches."""

    def loader(train: bool) -> DataLoader:
        data = random_images(24, size=8)
        return DataLoader(data, batch_size=4, shuffle=train, num_workers=1, persistent_workers=True)

    seen = []
    for callbacks in ([], [TemporalEnsemble(every_n_steps=1, bn="recompute", bn_batches=2)]):
        torch.manual_seed(0)
        seen.append(Seen())
        trainer = helpers.quiet_trainer(tmp_path, [*callbacks, seen[-1]], max_epochs=2, val_check_interval=2)
        trainer.fit(BNModule(loader))
    assert len(seen[0].sums) == 12 and len(set(seen[0].sums)) == 12
    assert seen[1].sums == seen[0].sums  # the same 12 batches, in the same order, with the ensemble on


def test_bn_re_estimation_drops_the_last_batch_as_the_users_loader_does(tmp_path: Path) -> None:
    """A BatchNorm that sees 1x1 maps (torchvision's ResNets on 32x32 images) cannot take a batch of one: users
    set drop_last=True for it, and the ensemble's BN pass used to feed that last batch anyway (ValueError)."""

    class PooledBN(BNModule):
        def __init__(self) -> None:
            super().__init__(lambda train: DataLoader(random_images(9, size=8), batch_size=4, drop_last=train))
            self.net = nn.Sequential(
                nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 10)
            )

    ens = TemporalEnsemble(every_n_steps=1, bn="recompute", bn_batches=5)
    quiet_trainer(tmp_path, [ens], max_epochs=2).fit(PooledBN())
    assert ens.n_updates == 4


def test_dict_batches_need_inputs_and_work_with_it(tmp_path: Path) -> None:
    data = random_images(16, size=8)

    def loader(train: bool) -> DataLoader:
        return DataLoader([{"image": x, "label": y} for x, y in data], batch_size=4)

    with pytest.raises(TypeError, match=r"got a dict; pass TemporalEnsemble\(inputs=lambda batch: batch\['image'\]\)"):
        quiet_trainer(tmp_path, [TemporalEnsemble(every_n_steps=1)], max_epochs=2).fit(BNModule(loader))
    for bn in ("recompute", "copy"):
        ens = TemporalEnsemble(every_n_steps=1, bn=bn, inputs=lambda batch: batch["image"])
        quiet_trainer(tmp_path, [ens], max_epochs=2).fit(BNModule(loader))
        assert ens.n_updates == 8


def test_lr_warmup_raises_the_reference_and_the_later_drop_still_counts() -> None:
    ens = TemporalEnsemble(every_n_steps=2, interval_factor=10)
    for lr in (0.001, 0.05, 0.1, 0.1):  # linear warm-up to 0.1
        ens.observe_lr(lr)
    assert ens.interval == 2 and ens.lr_at_interval_change == 0.1
    ens.observe_lr(0.01)  # the /10 drop
    assert ens.interval == 20 and ens.lr_at_interval_change == 0.01
    ens.observe_lr(0.01)
    assert ens.interval == 20


def test_bf16_true_module_with_the_ensemble(tmp_path: Path) -> None:
    ens = TemporalEnsemble(every_n_steps=1, bn="recompute", bn_batches=2)

    def loader(train: bool) -> DataLoader:
        return DataLoader(random_images(8, size=8), batch_size=4)

    module = BNModule(loader)
    helpers.quiet_trainer(tmp_path, [ens, RobustPruning(0.5, epoch=1)], max_epochs=2, precision="bf16-true").fit(module)
    assert ens.n_updates == 4 and next(module.parameters()).dtype == torch.bfloat16
    avg = next(ens._average_model.module.parameters())
    assert avg.dtype == torch.float32 and torch.equal(next(module.parameters()), avg.to(torch.bfloat16))


def test_validate_loads_a_pruned_plain_checkpoint_with_the_callback(tmp_path: Path) -> None:
    """Method "Ori" in a user's project (no reparameterize_): the checkpoint holds mask parametrizations,
    and RobustPruning gives the fresh module its masks for validate/test too, before the load."""

    def loader(train: bool) -> DataLoader:
        return DataLoader(random_images(8, size=8), batch_size=4)

    trainer = quiet_trainer(tmp_path, [RobustPruning(0.5, epoch=1)], max_epochs=2)
    trainer.fit(BNModule(loader))
    trainer.save_checkpoint(tmp_path / "ori.ckpt")
    fresh = BNModule(loader)
    quiet_trainer(tmp_path, [RobustPruning(0.5, epoch=1)]).validate(fresh, ckpt_path=tmp_path / "ori.ckpt")
    masks = [p.mask for _, _, p in iter_masked(fresh)]
    assert masks and sum(int((m == 0).sum()) for m in masks) == round(0.5 * sum(m.numel() for m in masks))


def test_sqrt_init_keeps_a_pretrained_backbone_function() -> None:
    torch.manual_seed(0)
    pretrained = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = pretrained(x)
        kept = reparameterize_(copy.deepcopy(pretrained), "hadamard", init="sqrt")
        changed = reparameterize_(copy.deepcopy(pretrained), "hadamard", init="random", seed=0)
        torch.testing.assert_close(kept(x), before, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(changed(x), before, atol=1e-3)
    for _, m, _ in iter_masked(kept):
        w1, w2 = m.parametrizations.weight.original0, m.parametrizations.weight.original1
        assert torch.equal(w1.abs(), w2)  # equal magnitudes, sign on W1 (the paper's Sec. III-B premise)
    with pytest.raises(ValueError, match=r"reparam\.init='sqrt' is defined for reparam\.kind='hadamard' only"):
        reparameterize_(copy.deepcopy(pretrained), "channel", init="sqrt")
