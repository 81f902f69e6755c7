"""Cutting emptied channels out of an exported model: exact outputs, exact parameter counts, and every
pattern where a zero channel is not removable left alone."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

from frep_lightning.channel_removal import channel_dependents
from frep_lightning.models import build_model
from frep_lightning.reparam import reparameterize_
from frep_lightning.slimming import save_program, slim, slim_


def _kill(conv: nn.Module, norm: nn.Module | None, dead: list[int]) -> None:
    """What structured pruning with ``remove_channels`` leaves: filter, bias, γ and β of ``dead`` are 0."""
    with torch.no_grad():
        conv.weight[dead] = 0
        if conv.bias is not None:
            conv.bias[dead] = 0
        if norm is not None:
            norm.weight[dead] = 0
            norm.bias[dead] = 0


def _random_stats(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)


class _Chain(nn.Module):
    """conv(bias) -> BN -> ReLU -> maxpool -> conv -> BN -> avgpool -> flatten -> dropout -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4, 10)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = nn.functional.adaptive_avg_pool2d(self.b2(self.c2(x)), 2)
        return self.fc(self.drop(torch.flatten(x, 1)))


def test_cut_channels_give_the_same_outputs_and_exact_parameter_counts() -> None:
    torch.manual_seed(0)
    net = _Chain().eval()
    _random_stats(net)
    _kill(net.c1, net.b1, [0, 3, 7])
    _kill(net.c2, net.b2, [1, 4])
    x = torch.rand(5, 3, 8, 8)
    small, report = slim(net, x)
    assert report["layers"] == {"c1": [8, 5], "c2": [6, 4]}
    expected = (5 * 3 * 9 + 5) + 2 * 5 + (4 * 5 * 9) + 2 * 4 + (10 * 4 * 4 + 10)  # flatten: 4 features/channel
    assert report["parameters"] == [sum(p.numel() for p in net.parameters()), expected]
    assert sum(p.numel() for p in small.parameters()) == expected
    # per image: c1 on 8x8, c2 on 4x4 (after the max pool), fc
    assert report["macs"] == [8 * 64 * 27 + 6 * 16 * 72 + 10 * 24, 5 * 64 * 27 + 4 * 16 * 45 + 10 * 16]
    assert small.c1.out_channels == small.b1.num_features == small.c2.in_channels == 5
    assert small.b1.running_mean.shape == (5,) and small.fc.in_features == 16
    torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-6)
    assert net.c1.out_channels == 8  # slim() works on a copy


@pytest.mark.parametrize(
    "name, width, narrowed",
    [
        ("resnet18", 8, [f"net.layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]),  # not conv2: + x
        ("vgg16_bn", 8, None),  # every conv: nothing but BN/ReLU/pool between them
        ("wrn28_10", 1, [f"net.blocks.{i}.conv1" for i in range(12)]),  # pre-activation: conv1 -> bn2 -> conv2
        ("resnet50", 4, None),
        # one ReLU module called twice per block (after bn1 and after the sum): stateless, so no obstacle
        ("torchvision.resnet18", None, [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]),
    ],
)
def test_built_in_models_lose_exactly_the_removable_channels(name: str, width: int, narrowed: list | None) -> None:
    torch.manual_seed(0)
    model = build_model(name, width=width) if width else getattr(torchvision.models, name.split(".")[1])()
    model.eval()
    _random_stats(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    paired = channel_dependents(model, convs)
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(1)
    for conv in convs:  # half of every conv's filters, as structured pruning with remove_channels leaves them
        out = modules[conv].out_channels
        dead = torch.randperm(out, generator=g)[: out // 2].tolist()
        _kill(modules[conv], modules[paired[conv][0]] if paired[conv] else None, dead)
    x = torch.rand(3, 3, 32, 32)
    small, report = slim(model, x)
    if name == "vgg16_bn":
        narrowed = convs
    elif name == "resnet50":  # the bottleneck's first two convs (conv3 and the shortcut feed the sum), and the
        # stem: only convs read it, layer1.0's conv1 and its projection shortcut (64 -> 256 channels)
        narrowed = [c for c in convs if c.endswith(("conv1", "conv2")) and "layer" in c] + ["net.conv1"]
    assert sorted(report["layers"]) == sorted(narrowed)
    assert all(after == before - before // 2 for before, after in report["layers"].values())
    assert report["parameters"][1] < report["parameters"][0] and report["untraced"] == []
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


class _Blocked(nn.Module):
    """Every reason a zero channel stays: a residual sum, a concatenation, a sigmoid gate, a grouped
    reader, a module called twice, a non-affine BN, a reshape, the output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.res, self.res_bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.cat = nn.Conv2d(4, 4, 1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.grouped_in = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.twice = nn.Conv2d(8, 8, 1)
        self.plain_bn_in, self.plain_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, affine=False)
        self.shaped = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.res_bn(self.res(x))
        x = torch.cat([x, self.cat(x)], dim=1)
        x = x * torch.sigmoid(self.gate(x))
        x = self.grouped(self.grouped_in(x))
        x = self.twice(self.twice(x))
        x = self.plain_bn(self.plain_bn_in(x))
        x = self.shaped(x).reshape(x.shape[0], 8, -1).mean(-1)[..., None, None]
        return self.head(x).flatten(1)


def test_zero_channels_that_still_matter_or_cannot_be_cut_stay() -> None:
    net = _Blocked().eval()
    _random_stats(net)
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and name != "head":
            _kill(m, net.res_bn if name == "res" else None, [0])
    x = torch.rand(2, 3, 6, 6)
    _, report = slim(net, x)
    assert report["layers"] == {}, report  # nothing here may be cut
    assert report["parameters"][0] == report["parameters"][1]


def test_a_channel_whose_batchnorm_shift_is_alive_is_kept() -> None:
    """Filter-only masking (``remove_channels=false``) leaves β: the channel outputs a constant."""
    net = _Chain().eval()
    _kill(net.c1, net.b1, [2])
    with torch.no_grad():
        net.b1.bias[2] = 0.5
    assert slim(net, torch.rand(2, 3, 8, 8))[1]["layers"] == {}


def test_a_fully_emptied_layer_keeps_one_channel() -> None:
    net = _Chain().eval()
    _kill(net.c2, net.b2, list(range(6)))
    x = torch.rand(2, 3, 8, 8)
    small, report = slim(net, x)
    assert report["layers"]["c2"] == [6, 1]
    torch.testing.assert_close(small(x), net(x))


def test_reparameterized_models_are_refused_and_a_wrong_cut_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _Chain()
    reparameterize_(net, "hadamard", seed=0)
    with pytest.raises(ValueError, match="merge"):
        slim_(net)
    import frep_lightning.slimming as slim_module

    plain = _Chain().eval()
    monkeypatch.setattr(slim_module, "_dead", lambda producer, norms: torch.arange(producer.weight.shape[0]) < 2)
    with pytest.raises(RuntimeError, match="changed the outputs"):
        slim(plain, torch.rand(2, 3, 8, 8))  # live channels "found dead": the check refuses the result
    assert plain.c1.out_channels == 8


def test_the_saved_program_runs_without_the_package_at_any_batch_size(tmp_path) -> None:
    torch.manual_seed(0)
    net = _Chain().eval()
    _kill(net.c1, net.b1, [1, 2])
    x = torch.rand(4, 3, 8, 8)
    small, _ = slim(net, x)
    save_program(small, tmp_path / "m.pt2", x)
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    for n in (1, 3):
        torch.testing.assert_close(loaded(x[:n]), net(x[:n]), rtol=1e-5, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # written atomically: no temp file left


class _AuxHead(nn.Module):
    """An auxiliary head that only training runs (GoogLeNet style): tracing in one mode does not see it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.aux = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.c1(x))
        out = self.c2(y).mean((2, 3))
        return out + self.aux(y).mean((2, 3)) if self.training else out


def test_a_branch_taken_in_one_mode_only_keeps_the_channels_it_reads() -> None:
    net = _AuxHead().eval()
    _kill(net.c1, None, [0, 1])
    x = torch.rand(2, 3, 8, 8)
    small, report = slim(net, x)
    assert report["layers"] == {}  # c1 feeds aux in training: cutting it would break fine-tuning the slim model
    torch.testing.assert_close(small.train()(x), net.train()(x))
    net = _Chain().eval()  # no such branch: a training-mode trace agrees, the cut happens
    _kill(net.c1, net.b1, [0])
    assert slim(net, x)[1]["layers"] == {"c1": [8, 7]}


def test_the_check_runs_in_eval_mode_and_leaves_the_model_as_it_was() -> None:
    """A model in training mode: dropout would differ between the two runs, and BatchNorm would update the
    caller's running statistics; both nets come back in the modes they had."""
    torch.manual_seed(0)
    net = _Chain().train()
    net.b2.eval()
    _kill(net.c1, net.b1, [0, 3])
    _kill(net.c2, net.b2, [1])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    small, report = slim(net, torch.rand(4, 3, 8, 8))
    assert report["layers"] == {"c1": [8, 6], "c2": [6, 5]}
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    for model in (net, small):
        assert model.training and model.drop.training and model.b1.training and not model.b2.training


def test_a_half_precision_model_is_checked_at_its_precision() -> None:
    """bfloat16: a narrower layer sums in another order, a rounding step apart: not a wrong cut."""
    torch.manual_seed(0)
    model = build_model("wrn28_10", width=2).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    paired = channel_dependents(model, convs)
    for conv in convs:
        m = model.get_submodule(conv)
        dead = torch.randperm(m.out_channels)[: m.out_channels // 2].tolist()
        _kill(m, model.get_submodule(paired[conv][0]) if paired[conv] else None, dead)
    small, report = slim(model.to(torch.bfloat16), torch.rand(8, 3, 32, 32).to(torch.bfloat16))
    assert len(report["layers"]) == 13 and small.net.conv1.weight.dtype == torch.bfloat16


class _Untraceable(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y[:, :4] if y.sum() > 0 else -y[:, :4]  # data-dependent: torch.fx cannot trace this


class _Clamped(nn.Module):
    """conv -> ``how`` -> conv, for every way a zero channel can reach the next conv as something else."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.act = nn.Hardtanh(0.1, 1.0) if how == "Hardtanh(0.1, 1)" else nn.ReLU6()
        if how == "c1 also in an untraced module":
            self.hidden = _Untraceable(self.c1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.c1(x)
        if self.how == "F.hardtanh(y, 0.1, 1.0)":
            return self.c2(nn.functional.hardtanh(y, 0.1, 1.0))
        if self.how == "F.conv2d(x, c1.weight)":  # the producer's weight read directly as well
            return self.c2(torch.relu(y)) + nn.functional.conv2d(x, self.c1.weight, padding=1)[:, :4]
        if self.how == "c1 also in an untraced module":  # the trace sees one call of c1, the model makes two
            return self.c2(torch.relu(y)) + self.hidden(x)
        return self.c2(self.act(y))


@pytest.mark.parametrize(
    "how", ["Hardtanh(0.1, 1)", "F.hardtanh(y, 0.1, 1.0)", "F.conv2d(x, c1.weight)", "c1 also in an untraced module"]
)
def test_zero_channels_reaching_a_constant_or_a_second_use_of_the_weights_stay(how: str) -> None:
    net = _Clamped(how).eval()
    _kill(net.c1, None, [0, 5])
    x = torch.rand(2, 3, 8, 8)
    small, report = slim(net, x)  # a cut here would change the outputs (and the check would refuse the model)
    assert report["layers"] == {}
    torch.testing.assert_close(small(x), net(x))


def test_a_clamp_that_keeps_zero_and_tied_weights() -> None:
    x = torch.rand(2, 3, 8, 8)
    net = _Clamped("ReLU6").eval()
    _kill(net.c1, None, [0, 5])
    assert slim(net, x)[1]["layers"] == {"c1": [8, 6]}

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)
            self.b.weight = self.a.weight  # one tensor: cutting it for a would change b

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    tied = Tied().eval()
    _kill(tied.a, None, [0, 1])
    with torch.no_grad():
        tied.b.bias[[0, 1]] = 0
    small, report = slim(tied, torch.rand(2, 8, 4, 4))
    assert report["layers"] == {} and small.a.weight is small.b.weight


def test_a_channels_last_model_stays_channels_last() -> None:
    net = _Chain().eval().to(memory_format=torch.channels_last)
    _kill(net.c1, net.b1, [1, 2])
    small, _ = slim(net, torch.rand(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert small.c1.weight.shape[0] == 6
    assert all(small.get_submodule(n).weight.is_contiguous(memory_format=torch.channels_last) for n in ("c1", "c2"))


class _MeanPooled(nn.Module):
    """conv -> BN -> ReLU -> ``x.mean((2, 3))`` -> Linear: the global average pool of MnasNet and much CIFAR code."""

    def __init__(self, keepdim: bool) -> None:
        super().__init__()
        self.keepdim = keepdim
        self.c1, self.b1, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        return self.fc(y.mean((2, 3)) if not self.keepdim else torch.flatten(y.mean([-1, -2], keepdim=True), 1))


@pytest.mark.parametrize("keepdim", [False, True])
def test_a_global_mean_before_the_classifier_is_a_pool(keepdim: bool) -> None:
    net = _MeanPooled(keepdim).eval()
    _random_stats(net)
    _kill(net.c1, net.b1, [0, 6])
    x = torch.rand(2, 3, 8, 8)
    small, report = slim(net, x)
    assert report["layers"] == {"c1": [8, 6]} and small.fc.in_features == 6
    torch.testing.assert_close(small(x), net(x))
