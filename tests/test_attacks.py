"""Attacks stay in the threat model, BN statistics are untouched, and they actually attack."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from frep_lightning.attacks import (
    FGSM,
    MIM,
    PGD,
    SignGradientAttack,
    check_adversarial,
    cross_entropy_loss,
    eval_mode,
    frozen_bn_stats,
    parse_eps,
)
from frep_lightning.objectives import SRE, CrossEntropyAT


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )


def test_parse_eps() -> None:
    assert parse_eps("8/255") == 8 / 255
    assert parse_eps(0.5) == 0.5
    for bad in ("abc", 0, -0.1, 2.0, "1/0"):
        with pytest.raises(ValueError, match="attack.eps"):
            parse_eps(bad)


def test_parse_eps_takes_decimal_fractions_and_spaces() -> None:
    """ "2.5/255" (a half-step eps) and "8 / 255" are what people type; each is the exactly rounded
    quotient, the float Python gives for the same literal division."""
    assert parse_eps("2.5/255") == 2.5 / 255
    assert parse_eps("0.5/255") == 0.5 / 255
    assert parse_eps("8 / 255") == 8 / 255
    assert parse_eps(" 2.5 /255 ") == 2.5 / 255
    assert parse_eps("16/255.0") == 16 / 255
    assert parse_eps("0.25") == 0.25 and parse_eps("1/1") == 1.0
    assert parse_eps("0.3/3") == 0.1  # exact decimals: not 0.3 / 3 == 0.09999999999999999 of binary floats
    for bad in ("2.5/0", "8/0.0", "a/255", "8/", "/255", "8/255/2", "8//255", "nan/255", "8/inf", None):
        with pytest.raises(ValueError, match=r"^eps=.* is not a number or a fraction like 8/255"):
            parse_eps(bad, "eps")
    for out in ("300/255", "-2.5/255", "0/255", "1.5"):
        with pytest.raises(ValueError, match=r"^eval\.eps=.* must be in \(0, 1\]"):
            parse_eps(out, "eval.eps")
    attack = PGD(eps="2.5 / 255", steps=2, step_size="0.5/255")
    assert attack.eps == 2.5 / 255 and attack.step_size == 0.5 / 255


def test_eval_mode_restores_every_submodules_own_mode() -> None:
    net = bn_net().train()
    net[1].eval()  # a BatchNorm its owner keeps frozen inside a training model
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[0].training and not net[1].training and net[4].training
    net.eval()
    with pytest.raises(KeyError), eval_mode(net):
        net.train()
        raise KeyError("restored on the way out of an error too")
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize(
    "attack", [FGSM(), PGD(steps=5), MIM(steps=5), SignGradientAttack(steps=3, random_start=False)]
)
def test_attacks_stay_in_ball_and_box(attack: SignGradientAttack) -> None:
    net = bn_net().eval()
    x = torch.rand(16, 3, 8, 8)
    x[:4] = 0.0  # corners of the box
    x[4:8] = 1.0
    y = torch.randint(0, 10, (16,))
    x_adv = attack.perturb(net, x, cross_entropy_loss(y))
    check_adversarial(x_adv, x, attack.eps)
    assert (x_adv - x).abs().max() <= attack.eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_check_adversarial_raises_on_violation() -> None:
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="threat model"):
        check_adversarial((x + 0.1).clamp(0, 1), x, 8 / 255)
    with pytest.raises(RuntimeError, match="threat model"):
        check_adversarial((x + 8 / 255 + 1e-4).clamp(0, 1), x, 8 / 255)  # just outside the ball
    nan = x.clone()
    nan[1, 2, 3, 3] = float("nan")  # passes every comparison: it must not pass the check
    with pytest.raises(RuntimeError, match="threat model"):
        check_adversarial(nan, x, 8 / 255)
    check_adversarial((x + 8 / 255).clamp(0, 1), x, 8 / 255)  # on the boundary is inside


def test_training_attack_leaves_running_stats_untouched() -> None:
    net = bn_net().train()
    bn = net[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    versions = [b._version for b in net.buffers()]
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    FGSM(bn="train").perturb(net, x, cross_entropy_loss(y))
    PGD(steps=3, bn="eval").perturb(net, x, cross_entropy_loss(y))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    # not even rewritten with the same values: a concurrent training forward (fast.streams=2) may update them
    assert [b._version for b in net.buffers()] == versions
    assert net.training and bn.momentum == 0.1 and bn.track_running_stats
    net(x)  # a normal training forward still updates them
    assert not torch.equal(bn.running_mean, before[0])


def test_frozen_bn_stats_normalises_by_the_batch() -> None:
    """The attack's forward in training mode uses the batch's own statistics (what the loss then trains)."""
    torch.manual_seed(0)
    net = bn_net().train()
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)  # far from the batch's: using them would change the output
    x = torch.rand(8, 3, 8, 8)
    with torch.no_grad(), frozen_bn_stats(net):
        frozen = net(x)
    reference = copy.deepcopy(net)
    with torch.no_grad():
        live = reference(x)  # batch statistics, running ones updated in the copy
    assert torch.equal(frozen, live)
    assert torch.equal(net[1].running_mean, torch.full_like(net[1].running_mean, 5.0))


def test_attack_does_not_accumulate_parameter_gradients() -> None:
    net = bn_net()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    PGD(steps=2).perturb(net, x, cross_entropy_loss(y))
    assert all(p.grad is None for p in net.parameters())


class _InputRecorder(nn.Module):
    """A linear classifier that records every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.net(x)


def test_fgsm_rs_is_one_signed_step_of_eps_from_a_uniform_start_in_the_box() -> None:
    """Alg. 1 lines 4-6: x~ = clip(x + U(-eps, eps)), then one step eps * sign(grad of the attack loss at x~),
    projected onto the eps-ball and [0, 1]. The model is only ever shown images (the start is clipped first)."""
    eps = 8 / 255
    net = _InputRecorder().eval()
    x = torch.rand(256, 3, 8, 8) * 0.5 + 0.25  # the box binds only where it is put below
    x[:8] = 0.0  # box corners: the start must be clipped before the model sees it
    x[8:16] = 1.0
    y = torch.randint(0, 10, (256,))
    x_adv = FGSM().perturb(net, x, cross_entropy_loss(y), generator=torch.Generator().manual_seed(3))
    (start,) = net.inputs
    assert start.min() >= 0 and start.max() <= 1
    noise = (start - x)[16:]  # interior pixels: the uniform draw itself
    assert noise.abs().max() <= eps + 1e-6
    assert noise.min() < -0.99 * eps and noise.max() > 0.99 * eps  # the whole ball, both signs
    assert abs(float(noise.mean())) < 0.01 * eps and float(noise.std()) == pytest.approx(eps / 3**0.5, rel=0.02)
    # the same generator, the same start
    again = _InputRecorder().eval()
    FGSM().perturb(again, x, cross_entropy_loss(y), generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.inputs[0], start)
    # the step: ascent on CE at the start, size eps, then the projection
    probe = start.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net.net(probe), y), probe)
    expected = torch.min(torch.max(start + eps * grad.sign(), x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-7)
    with torch.no_grad():
        assert nn.functional.cross_entropy(net.net(x_adv), y) > nn.functional.cross_entropy(net.net(start), y)


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_training_attack_forward_uses_the_batchnorm_statistics_its_bn_mode_names(bn: str) -> None:
    """``bn=train``: the attack's forward of a training model normalises by the batch (what the loss then
    trains); ``bn=eval``: by the running statistics. Either way the model comes back in training mode."""
    net = bn_net().train()
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)  # far from any batch's: the two modes give different outputs
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    seen: list[torch.Tensor] = []

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.detach().clone())
        return nn.functional.cross_entropy(logits, y)

    SignGradientAttack(steps=1, random_start=False, bn=bn).perturb(net, x, loss_fn)
    reference = copy.deepcopy(net).train(bn == "train")
    with torch.no_grad():
        expected, other = reference(x), copy.deepcopy(net).train(bn != "train")(x)
    assert torch.equal(seen[0], expected)
    assert not torch.allclose(seen[0], other)
    assert all(m.training for m in net.modules())


def test_public_attack_defaults_are_the_papers() -> None:
    """eps 8/255 everywhere; FGSM(-RS) and the bare attack: one step of eps from a uniform start (Alg. 1);
    PGD: 10 steps of 2/255 from a uniform start (Madry et al.); MIM: 50 steps of 2/255, momentum 1, from x
    (Dong et al.). FReP's default training attack and its per-epoch validation PGD use them."""
    from frep_lightning.module import FReP

    fgsm, pgd, mim, bare = FGSM(), PGD(), MIM(), SignGradientAttack()
    assert fgsm.eps == pgd.eps == mim.eps == bare.eps == 8 / 255
    for one_step in (fgsm, bare):
        settings = (one_step.steps, one_step.step_size, one_step.random_start, one_step.momentum, one_step.bn)
        assert settings == (1, 8 / 255, True, None, "train")
    assert (pgd.steps, pgd.step_size, pgd.random_start, pgd.momentum) == (10, 2 / 255, True, None)
    assert (mim.steps, mim.step_size, mim.random_start, mim.momentum) == (50, 2 / 255, False, 1.0)
    assert SignGradientAttack(steps=7).step_size == 2 / 255  # several steps: eps / 4
    module = FReP(bn_net(), reparam_kind="none")
    assert (module.attack.eps, module.attack.steps, module.attack.step_size) == (8 / 255, 1, 8 / 255)
    assert module.attack.random_start and isinstance(module.objective, SRE) and module.objective.lam == 6.0
    assert module.val_attack is not None
    assert (module.val_attack.eps, module.val_attack.steps, module.val_attack.step_size) == (8 / 255, 10, 2 / 255)
    assert module.val_attack.random_start


def test_pgd_breaks_an_undefended_linear_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    x = torch.rand(64, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)  # clean accuracy 100% by construction
    x_adv = PGD(eps=0.25, steps=10, step_size=0.05).perturb(net.eval(), x, cross_entropy_loss(y))
    with torch.no_grad():
        assert (net(x_adv).argmax(1) == y).float().mean() < 0.05


def test_sre_loss_matches_definition() -> None:
    torch.manual_seed(0)
    lc, la, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    pc, pa = lc.softmax(1), la.softmax(1)
    onehot = torch.eye(4)[y]
    expected = ((pc - onehot) ** 2).sum(1).mean() + 2.0 * ((pa - pc) ** 2).sum(1).mean()
    assert torch.allclose(SRE(lam=2.0)(lc, la, y), expected)
    assert torch.allclose(SRE().attack_loss(la, lc, y), ((pa - pc) ** 2).sum(1).mean())
    # attack_target=sre: all of L_SRE(W, x~, y) = ||f(x~) - y||^2 + lam ||f(x~) - f(x)||^2, lam included
    for lam in (6.0, 0.5):
        full = SRE(lam=lam, attack_target="sre").attack_loss(la, lc, y)
        assert torch.allclose(full, ((pa - onehot) ** 2).sum(1).mean() + lam * ((pa - pc) ** 2).sum(1).mean())
    assert torch.allclose(CrossEntropyAT()(None, la, y), nn.functional.cross_entropy(la, y))
    with pytest.raises(ValueError, match="attack_target"):
        SRE(attack_target="kl")


def test_overfitting_monitor_warns_on_collapse() -> None:
    from frep_lightning.monitor import RobustnessMonitor

    mon = RobustnessMonitor()
    assert not mon.observe(0.15, 0)
    assert not mon.observe(0.05, 0)  # best below min_best: nothing to compare with yet
    assert not mon.observe(0.30, 1)
    assert not mon.observe(0.25, 2)  # a dip, not a collapse
    with pytest.warns(UserWarning, match="CATASTROPHIC OVERFITTING"):
        assert mon.observe(0.02, 3)
    assert mon.collapsed_epochs == [3] and mon.best == 0.30


class _AutocastRecorder(nn.Module):
    """A tiny classifier that records, per forward, whether autocast was on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
        self.autocast: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        return self.net(x)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_per_epoch_attacks_are_crafted_in_their_precision_and_scored_in_fp32(precision: str) -> None:
    """val_attack_precision / monitor.precision: the attack's forwards (2 PGD steps) run under bf16 autocast
    when asked; the accuracy forwards (clean, adversarial) never do, so a reported accuracy is an fp32 one."""
    from types import SimpleNamespace

    from frep_lightning.module import FReP
    from frep_lightning.monitor import RobustnessMonitor

    recorder = _AutocastRecorder()
    module = FReP(recorder, val_attack_steps=2, val_attack_precision=precision)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer here
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    module.eval()
    module.validation_step((x, y), 0)
    attack = precision == "bf16"
    assert recorder.autocast == [False, attack, attack, False]  # clean, PGD step 1, PGD step 2, adversarial

    recorder.autocast.clear()
    monitor = RobustnessMonitor(n_images=4, steps=2, batch_size=4, precision=precision)
    datamodule = SimpleNamespace(train_subset_loader=lambda n, bs: [(x, y)])
    monitor.on_train_epoch_end(SimpleNamespace(datamodule=datamodule, current_epoch=0), module)  # type: ignore[arg-type]
    assert recorder.autocast == [attack, attack, False]  # PGD step 1, step 2, the scoring forward
    with pytest.raises(ValueError, match="val_attack_precision"):
        FReP(_AutocastRecorder(), val_attack_precision="fp16")
