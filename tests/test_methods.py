"""Baselines and objective swaps in one harness: every method config composes and trains a couple
of steps on a tiny model; TRADES / MART / PGD-AT losses match hand formulas; LWM's gradual
pruning reaches its exact target with monotone masks."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from frep_lightning.attacks import SignGradientAttack
from frep_lightning.config import enabled, validate_train_config
from frep_lightning.lwm import GradualPruning, cubic_sparsity, monotone_masks
from frep_lightning.objectives import MART, SRE, TRADES, CrossEntropyAT
from frep_lightning.pruning import RobustPruning
from frep_lightning.reparam import Hadamard, Plain, iter_masked, reparameterize_
from frep_lightning.train import build_callbacks, build_module, config_dir
from helpers import quiet_trainer


def cfg_for(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def tiny_loaders(n: int = 8) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=n), DataLoader(data, batch_size=n)


# method -> (objective class, attack steps, reparam parametrization after init, pruned?, ensemble?)
METHODS = {
    "frep": (SRE, 1, Hadamard, True, True),
    "frep_ch": (SRE, 1, None, True, True),
    "ori": (SRE, 1, Plain, True, True),
    "sparse_init": (SRE, 1, Plain, True, True),
    "dense_at": (CrossEntropyAT, 10, None, False, False),
    "lwm": (CrossEntropyAT, 10, Plain, True, False),
    "fgsm": (CrossEntropyAT, 1, Plain, True, False),
}


def fit_tiny(cfg: DictConfig, tmp_path: Path, epochs: int = 2) -> tuple[pl.LightningModule, list[Callback], pl.Trainer]:
    """The real app's builders on random data: 1 batch of 8 images per epoch, pruning at epoch 0."""
    with open_dict(cfg):
        cfg.model.width = 4
        cfg.val_attack_steps = 1
        cfg.monitor = None
        if cfg.get("pruning") is not None and "_target_" in cfg.pruning:
            cfg.pruning.epoch = 0
        if cfg.get("ensemble") is not None and "_target_" in cfg.ensemble:
            cfg.ensemble.every_n_steps = 1
            cfg.ensemble.bn_batches = 1
        cfg.trainer.max_epochs = epochs
        cfg.optim.milestones = [1]
    validate_train_config(cfg)
    module = build_module(cfg)
    callbacks, export = build_callbacks(cfg, tmp_path)
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs=epochs, enable_checkpointing=True, num_sanity_val_steps=0)
    train, val = tiny_loaders()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    assert export.path is not None and export.path.is_file()
    return module, callbacks, trainer


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_composes_and_trains(method: str, tmp_path: Path) -> None:
    objective_cls, steps, parametrization, pruned, ensembled = METHODS[method]
    cfg = cfg_for(f"method={method}", "++pruning.sparsity=0.8", "logger=none")  # ++: dense_at has no pruning
    assert cfg.method.name == method
    if method == "sparse_init":  # right after init: plain weights equal to the FReP product W1*W2
        torch.manual_seed(0)
        frep = build_module(cfg_for("method=frep", "model.width=4"))
        torch.manual_seed(0)
        fused = build_module(cfg_for("method=sparse_init", "model.width=4"))
        assert not list(iter_masked(fused.model))
        assert torch.equal(frep.model.net.conv1.weight.detach(), fused.model.net.conv1.weight.detach())
    module, callbacks, trainer = fit_tiny(cfg, tmp_path)
    assert type(module.objective) is objective_cls and module.attack.steps == steps
    kinds = {type(p) for _, _, p in iter_masked(module.model)}
    if parametrization is not None:
        assert kinds == {parametrization}
    names = {type(cb).__name__ for cb in callbacks}
    assert ("TemporalEnsemble" in names) == ensembled
    # Eq. 14 (Fig. 5b): ensemble-vs-live output distance logged at each validation with an ensemble
    assert ("ensemble/delta" in trainer.logged_metrics) == ensembled
    if ensembled:
        assert 0.0 <= float(trainer.logged_metrics["ensemble/delta"]) <= 2.0
    assert any(isinstance(cb, RobustPruning) for cb in callbacks) == pruned
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    weights = [v for k, v in state.items() if k.endswith(".weight") and v.dim() in (2, 4)]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    if method == "frep_ch":  # structured by default: whole output channels, counted globally
        assert cfg.pruning.mode == "structured"
        head = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2][-1]
        assert bool((state[head] != 0).any(dim=1).all())  # every class keeps its row: the head stays dense
        rows = [w.flatten(1) for k, w in state.items() if k.endswith(".weight") and w.dim() == 4]
        dead = sum(int((r == 0).all(1).sum()) for r in rows)
        assert dead == round(0.8 * sum(r.shape[0] for r in rows)) and zeros == sum(
            int((r == 0).all(1).sum()) * r.shape[1] for r in rows
        )
    elif pruned:
        assert zeros == round(0.8 * total)
    elif not pruned:
        assert zeros == 0
    if method == "lwm":
        (lwm,) = [cb for cb in callbacks if isinstance(cb, GradualPruning)]
        assert lwm.history == [(0, cubic_sparsity(1, 2, 0.8)), (1, 0.8)]  # end_epoch: 0 + (2 - 0) // 2 = 1


@pytest.mark.parametrize(
    ("objective", "cls", "steps"),
    [("pgd", CrossEntropyAT, 10), ("trades", TRADES, 10), ("mart", MART, 10), ("fgsm", CrossEntropyAT, 1)],
)
def test_objective_swap_on_frep(objective: str, cls: type, steps: int, tmp_path: Path) -> None:
    cfg = cfg_for("method=frep", f"objective={objective}", "logger=none")
    assert cfg.method.name == "frep" and cfg.method.reparam_kind == "hadamard"
    module, _, _ = fit_tiny(cfg, tmp_path, epochs=1)
    assert type(module.objective) is cls and module.attack.steps == steps and module.attack.random_start
    assert module.attack.step_size == pytest.approx((2 if steps == 10 else 10) / 255)


@pytest.mark.parametrize("init", ["ones", "equal"])
def test_reparam_init_key_reaches_the_factors(init: str) -> None:
    """`reparam.init` (the Table VIII key) sets how every layer's factors start."""
    module = build_module(cfg_for(f"reparam.init={init}", "model.width=4"))
    layers = [m for _, m, _ in iter_masked(module.model)]
    assert layers
    for m in layers:
        w1, w2 = m.parametrizations.weight.original0, m.parametrizations.weight.original1
        assert torch.equal(w2, torch.ones_like(w2) if init == "ones" else w1.abs())


def test_command_line_objective_wins_over_the_method_choice() -> None:
    assert cfg_for("method=lwm", "objective=trades").method.objective._target_.endswith("TRADES")
    assert cfg_for("method=dense_at", "pruning=unstructured").pruning._target_.endswith("RobustPruning")


# -- losses against hand formulas ------------------------------------------------------------
CLEAN = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
ADV = torch.tensor([[0.5, 1.5, -0.5], [1.0, -1.0, 0.0]])
Y = torch.tensor([0, 2])


def softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_pgd_at_cross_entropy_by_hand() -> None:
    ce = CrossEntropyAT()
    expected = -(math.log(softmax(ADV[0].tolist())[0]) + math.log(softmax(ADV[1].tolist())[2])) / 2
    assert ce(None, ADV, Y).item() == pytest.approx(expected, rel=1e-6)
    assert ce.attack_loss(ADV, None, Y).item() == pytest.approx(expected, rel=1e-6)
    assert not ce.uses_clean


def test_trades_by_hand() -> None:
    beta = 6.0
    ce = kl = 0.0
    for i in range(2):
        p, q = softmax(CLEAN[i].tolist()), softmax(ADV[i].tolist())
        ce -= math.log(p[int(Y[i])]) / 2
        kl += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q)) / 2
    trades = TRADES(beta=beta)
    assert trades(CLEAN, ADV, Y).item() == pytest.approx(ce + beta * kl, rel=1e-6)
    assert trades.attack_loss(ADV, CLEAN, Y).item() == pytest.approx(kl, rel=1e-6)
    # the attack's reference is constant: no gradient reaches the clean logits
    clean, adv = CLEAN.clone().requires_grad_(True), ADV.clone().requires_grad_(True)
    trades.attack_loss(adv, clean, Y).backward()
    assert clean.grad is None and adv.grad is not None and adv.grad.abs().sum() > 0


def test_mart_by_hand() -> None:
    beta = 6.0
    total = 0.0
    for i in range(2):
        p, q, y = softmax(CLEAN[i].tolist()), softmax(ADV[i].tolist()), int(Y[i])
        wrong = max((k for k in range(3) if k != y), key=lambda k: q[k])
        bce = -math.log(q[y]) - math.log(1.0001 - q[wrong] + 1e-12)
        kl = sum(pk * (math.log(pk) - math.log(qk + 1e-12)) for pk, qk in zip(p, q))
        total += (bce + beta * kl * (1.0000001 - p[y])) / 2
    mart = MART(beta=beta)
    assert mart(CLEAN, ADV, Y).item() == pytest.approx(total, rel=1e-6)
    expected_attack = -(math.log(softmax(ADV[0].tolist())[0]) + math.log(softmax(ADV[1].tolist())[2])) / 2
    assert mart.attack_loss(ADV, CLEAN, Y).item() == pytest.approx(expected_attack, rel=1e-6)


def _reference_loss(
    objective: SRE | TRADES | MART, lc: torch.Tensor, la: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The training losses as the papers / reference code write them (MART: its top-2 argsort for the wrong
    class; TRADES: KLDivLoss of log p_adv against p_clean), every term differentiable in both outputs."""
    pc, pa = lc.softmax(dim=1), la.softmax(dim=1)
    if isinstance(objective, SRE):
        onehot = nn.functional.one_hot(y, lc.shape[1]).float()
        return ((pc - onehot) ** 2).sum(1).mean() + objective.lam * ((pa - pc) ** 2).sum(1).mean()
    if isinstance(objective, TRADES):
        kl = nn.KLDivLoss(reduction="sum")(nn.functional.log_softmax(la, dim=1), pc) / len(y)
        return nn.functional.cross_entropy(lc, y) + objective.beta * kl
    top2 = torch.argsort(pa, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted = nn.functional.cross_entropy(la, y) + nn.functional.nll_loss(torch.log(1.0001 - pa + 1e-12), new_y)
    kl = nn.KLDivLoss(reduction="none")(torch.log(pa + 1e-12), pc).sum(1)
    true_probs = torch.gather(pc, 1, y[:, None]).squeeze(1)
    return boosted + objective.beta * (kl * (1.0000001 - true_probs)).sum() / len(y)


@pytest.mark.parametrize("objective", [SRE(lam=6.0), SRE(lam=0.5), TRADES(beta=6.0), MART(beta=6.0)], ids=repr)
def test_training_losses_match_the_reference_in_value_and_in_both_gradients(objective: SRE | TRADES | MART) -> None:
    """What the optimizer minimises is differentiated through the clean output too (unlike the attack's
    detached reference), and MART's wrong class is the most likely class other than y even where the
    adversarial prediction is y (half the rows here)."""
    torch.manual_seed(0)
    lc, la = torch.randn(16, 10) * 2, torch.randn(16, 10) * 2
    y = torch.randint(0, 10, (16,))
    y[:8] = la[:8].argmax(dim=1)  # classified correctly under attack
    ours_c, ours_a = lc.clone().requires_grad_(True), la.clone().requires_grad_(True)
    ref_c, ref_a = lc.clone().requires_grad_(True), la.clone().requires_grad_(True)
    ours, ref = objective(ours_c, ours_a, y), _reference_loss(objective, ref_c, ref_a, y)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    got = torch.autograd.grad(ours, (ours_c, ours_a))
    want = torch.autograd.grad(ref, (ref_c, ref_a))
    for g, w, name in zip(got, want, ("clean", "adversarial"), strict=True):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"d loss / d {n} logits: {m}")


@pytest.mark.parametrize("objective", [SRE(), SRE(attack_target="sre"), TRADES(), MART()], ids=repr)
def test_objectives_compute_in_fp32_under_cpu_bf16_autocast(objective: SRE | TRADES | MART) -> None:
    """CPU autocast keeps softmax / log_softmax in bf16 (CUDA's upcasts them): the losses of bf16 logits
    must still be the fp32 losses of the same logits, not ones of probabilities rounded to 3 digits."""
    torch.manual_seed(0)
    clean, adv = torch.randn(32, 10).bfloat16(), torch.randn(32, 10).bfloat16()
    y = torch.randint(0, 10, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (objective(clean, adv, y), objective.attack_loss(adv, clean, y))
    want = (objective(clean.float(), adv.float(), y), objective.attack_loss(adv.float(), clean.float(), y))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        assert g.item() == pytest.approx(w.item(), rel=1e-6)


@pytest.mark.parametrize("cls", [TRADES, MART])
def test_objectives_validate_beta(cls: type) -> None:
    with pytest.raises(ValueError, match=r"method\.objective\.beta"):
        cls(beta=-1.0)


def test_trades_attack_increases_its_loss() -> None:
    """PGD-10 on TRADES' attack loss ends above its random start (the sign ascent works on KL)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    trades = TRADES()
    ref = net(x).detach()
    start = SignGradientAttack(eps="8/255", steps=1, step_size="1e-9", random_start=True)
    pgd = SignGradientAttack(eps="8/255", steps=10, step_size="2/255", random_start=True)
    loss = lambda out: trades.attack_loss(out, ref, y)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    at_start = loss(net(start.perturb(net, x, loss, generator=g))).item()
    after = loss(net(pgd.perturb(net, x, loss, generator=torch.Generator().manual_seed(1)))).item()
    assert after > 2 * at_start


# -- LWM: gradual magnitude pruning -----------------------------------------------------------
def test_cubic_schedule_values() -> None:
    assert cubic_sparsity(0, 4, 0.9) == 0.0
    assert cubic_sparsity(1, 4, 0.9) == pytest.approx(0.9 * (1 - 0.75**3))
    assert cubic_sparsity(2, 4, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(4, 4, 0.9) == 0.9 and cubic_sparsity(9, 4, 0.9) == 0.9


def test_monotone_masks_never_revive_even_through_ties() -> None:
    w = {"a": torch.tensor([0.0, 0.0, 3.0, 0.5]), "b": torch.tensor([[0.0, 2.0], [0.1, 0.0]])}
    old = {"a": torch.tensor([0.0, 1.0, 1.0, 1.0]), "b": torch.tensor([[1.0, 1.0], [1.0, 0.0]])}
    # live entries: a1 (|0|), a2, a3, b00 (|0|), b01, b10 -> keep 4 of 8 = the 4 largest live
    masks = monotone_masks(w, old, sparsity=0.5)
    assert masks["a"].tolist() == [0.0, 0.0, 1.0, 1.0] and masks["b"].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    # asking for less sparsity than already reached keeps every live entry and revives nothing
    masks = monotone_masks(w, old, sparsity=0.0)
    assert all(torch.equal(masks[n], old[n]) for n in w)


def test_monotone_channel_masks_exact_and_keep_one_per_layer() -> None:
    torch.manual_seed(0)
    w = {"c1": torch.randn(8, 3, 3, 3), "c2": torch.randn(6, 8, 3, 3) * 0.01}
    old = {n: torch.ones_like(v) for n, v in w.items()}
    old["c1"][:2] = 0
    masks = monotone_masks(w, old, sparsity=0.75, mode="structured")
    rows = {n: m.flatten(1).amax(1) for n, m in masks.items()}
    assert int(sum(r.sum() for r in rows.values())) == 14 - round(0.75 * 14)
    assert rows["c1"][:2].sum() == 0 and rows["c2"].sum() >= 1
    for n, m in masks.items():  # whole channels
        assert torch.equal(m, rows[n].view(-1, 1, 1, 1).expand_as(m))


class MaskRecorder(Callback):
    """Records every layer's mask at each epoch start (after the pruning callback ran)."""

    def __init__(self) -> None:
        self.masks: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.masks.append({n: p.mask.detach().clone() for n, _, p in iter_masked(pl_module)})


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
def test_lwm_reaches_exact_target_at_end_epoch_with_monotone_masks(mode: str, tmp_path: Path) -> None:
    from frep_lightning import FReP
    from frep_lightning.models import build_model

    torch.manual_seed(0)
    module = FReP(
        build_model("resnet18", width=4),
        objective=CrossEntropyAT(),
        attack=SignGradientAttack(steps=1, step_size="10/255"),
        reparam_kind="none",
        milestones=[4],
        val_attack_steps=0,
    )
    final = 0.9 if mode == "unstructured" else 0.5
    pruning = GradualPruning(sparsity=final, epoch=1, end_epoch=3, mode=mode)
    recorder = MaskRecorder()
    trainer = quiet_trainer(tmp_path, [pruning, recorder], max_epochs=5, limit_val_batches=0)
    train, val = tiny_loaders()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    assert [e for e, _ in pruning.history] == [1, 2, 3] and pruning.pruned
    assert [s for _, s in pruning.history] == [cubic_sparsity(k, 3, final) for k in (1, 2, 3)]

    def kept(masks: dict[str, torch.Tensor]) -> tuple[int, int]:
        if mode == "unstructured":
            return sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
        heads = [m for m in masks.values() if m.dim() == 2]  # the classifier: its rows are the classes
        assert len(heads) == 1 and bool(heads[0].all())
        rows = [m.flatten(1).amax(1) for m in masks.values() if m.dim() == 4]
        return sum(int(r.sum()) for r in rows), sum(r.numel() for r in rows)

    for epoch, masks in enumerate(recorder.masks):
        n_kept, total = kept(masks)
        assert n_kept == total - round(pruning.target_sparsity(epoch, 5) * total), epoch
        if epoch:
            for name, m in masks.items():  # monotone: nothing pruned comes back
                assert torch.all(m <= recorder.masks[epoch - 1][name]), (epoch, name)
    assert all(torch.equal(recorder.masks[4][n], m) for n, m in recorder.masks[3].items())  # no step after end
    n_kept, total = kept(recorder.masks[3])
    assert n_kept == total - round(final * total)  # exact target at the final pruning epoch
    for _, layer, p in iter_masked(module.model):  # and the weights really are zero there
        assert torch.all(layer.weight[p.mask == 0] == 0)


def test_lwm_validates_end_epoch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"pruning\.end_epoch"):
        GradualPruning(sparsity=0.9, epoch=5, end_epoch=3)
    net = reparameterize_(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), kind="none")
    pruning = GradualPruning(sparsity=0.9, epoch=1, end_epoch=4)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

    with pytest.raises(ValueError, match=r"pruning\.end_epoch=4 must be < trainer\.max_epochs=4"):
        pruning.setup(trainer, Tiny(), "fit")
    assert GradualPruning(sparsity=0.9, epoch=30).final_epoch(100) == 65


def test_lwm_fails_before_training_when_its_final_step_cannot_run(tmp_path: Path) -> None:
    """Unlimited epochs without end_epoch, or a max_steps that stops before end_epoch, fail at the start
    (not mid-run, and not with a model exported at an intermediate sparsity)."""
    from frep_lightning import FReP
    from frep_lightning.models import build_model

    net = reparameterize_(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), kind="none")

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

    unlimited = pl.Trainer(max_epochs=-1, max_steps=50, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"pruning\.end_epoch must be set"):
        GradualPruning(sparsity=0.9, epoch=1).setup(unlimited, Tiny(), "fit")

    module = FReP(
        build_model("resnet18", width=4),
        objective=CrossEntropyAT(),
        attack=SignGradientAttack(steps=1, step_size="10/255"),
        reparam_kind="none",
        val_attack_steps=0,
    )
    pruning = GradualPruning(sparsity=0.9, epoch=1, end_epoch=3)
    trainer = quiet_trainer(tmp_path, [pruning], max_epochs=5, max_steps=3, limit_val_batches=0)  # 1 batch/epoch
    with pytest.raises(ValueError, match=r"pruning\.end_epoch=3 starts after optimizer step 3 .* trainer\.max_steps=3"):
        trainer.fit(module, *tiny_loaders())
    assert pruning.history == []


def test_lwm_stopped_midway_says_its_sparsity() -> None:
    pruning = GradualPruning(sparsity=0.9, epoch=1, end_epoch=3)
    pruning.last_epoch, pruning.current_sparsity = 2, 0.5
    trainer = pl.Trainer(max_epochs=5, logger=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match=r"pruned to 0\.5000, NOT to the target 0\.9000"):
        pruning.on_train_end(trainer, pl.LightningModule())


def test_lwm_state_round_trips() -> None:
    a = GradualPruning(sparsity=0.9, epoch=1, end_epoch=3)
    a.history, a.last_epoch, a.current_sparsity, a.pruned = [(1, 0.5), (2, 0.8)], 2, 0.8, False
    b = GradualPruning(sparsity=0.9, epoch=1, end_epoch=3)
    b.load_state_dict(a.state_dict())
    assert (b.history, b.last_epoch, b.current_sparsity, b.pruned) == ([(1, 0.5), (2, 0.8)], 2, 0.8, False)


def test_ce_fgsm_uses_wong_step() -> None:
    cfg = cfg_for("method=fgsm")
    assert cfg.method.attack.step_size == "10/255" and cfg.method.attack.steps == 1
    assert not enabled(cfg.ensemble) and cfg.method.reparam_kind == "none"


def test_validate_live_logs_the_live_models_accuracies_through_the_config(tmp_path: Path) -> None:
    """ensemble.validate_live=true on the real FReP module: the live model's clean and PGD accuracies on the
    validation images beside the ensemble's (Fig. 5a), with the module's own validation attack."""
    cfg = cfg_for("method=frep", "++pruning.sparsity=0.8", "logger=none", "ensemble.validate_live=true")
    _, _, trainer = fit_tiny(cfg, tmp_path)
    metrics = trainer.logged_metrics
    assert {"val/acc", "val/pgd1", "val_live/acc", "val_live/pgd1"} <= set(metrics)
    assert all(0.0 <= float(metrics[k]) <= 1.0 for k in ("val_live/acc", "val_live/pgd1"))
