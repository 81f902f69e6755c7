"""Cut the channels that structured pruning emptied out of the network: a smaller dense model for deployment.

Structured pruning (``mode=structured`` with ``pruning.remove_channels=true``) leaves a pruned output
channel contributing exactly 0: its filter, its bias and the γ/β of the BatchNorm reading it are 0.
The exported ``model.pt`` still computes that channel, so its size and FLOPs are those of the dense
network. :func:`slim_` removes such a channel from the layer that produces it, from the BatchNorms on
the way and from the input of the layers that read it, wherever that leaves every output unchanged:

- the producer is a ``Conv2d`` or ``Linear`` (``groups=1``), called once;
- between it and its readers there are only BatchNorms (called once, γ = β = 0 on the channel) and
  per-channel operations that map 0 to 0 (ReLU-like activations, dropout, max/avg pooling, a
  ``flatten`` or a global ``mean`` before a ``Linear``);
- every reader is a ``Conv2d`` (``groups=1``) or ``Linear`` called once;
- none of these layers' weights is used otherwise (a second name, a tied parameter, a direct
  ``F.conv2d(x, layer.weight)``), and all of this holds in training as in evaluation mode (a branch on
  ``self.training``, such as an auxiliary head, is in one mode's trace only).

A channel that reaches anything else is kept: a residual sum (the identity path carries the channel:
the last conv of a ResNet block keeps its width), a concatenation, a reshape, the model's output.
So for the built-in CIFAR models the inner convs of each block shrink, VGG shrinks everywhere.
The model is traced with ``torch.fx``; modules it cannot trace are kept as they are (and named).

Example (``frep-eval ckpt=<run> slim=true`` does this and evaluates the smaller network)::

    model.load_state_dict(torch.load("model.pt", weights_only=True))
    small, report = slim(model.eval(), example=x)   # a copy; raises if any output changed
    save_program(small, "model_slim.pt2", x)          # torch.export.load() runs it without this package
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from frep_lightning.attacks import eval_mode, module_mode
from frep_lightning.channel_removal import trace
from frep_lightning.export import atomic_write_bytes

# per-channel and f(0) = 0: a channel that is all zeros stays all zeros, and no other channel reads it
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh, nn.Hardtanh,
    nn.Identity, nn.Dropout,
)  # fmt: skip
_SPATIAL_MODULES = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout2d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardtanh, torch.tanh, F.dropout,
}  # fmt: skip
_SPATIAL_FUNCTIONS = {
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout2d,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous"}


@dataclass
class _Chain:
    """What reads one producer's output: the BatchNorms on the way and the reading layers, each with the
    number of input features per channel (1, or H*W after a flatten)."""

    norms: list[nn.Module] = field(default_factory=list)
    readers: list[tuple[nn.Module, int]] = field(default_factory=list)


def _flatten_from_1(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``torch.flatten(x, 1)``, ``x.flatten(1)`` or ``nn.Flatten()``: channel-major features."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _spatial_mean(node: fx.Node) -> str | None:
    """The layout after ``x.mean((2, 3))`` / ``torch.mean(x, [-2, -1], keepdim)`` (a global average pool, as
    in MnasNet): "vector" (batch, channels), "spatial" with ``keepdim``; None for any other call."""
    if (node.op, node.target) not in (("call_method", "mean"), ("call_function", torch.mean)):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not isinstance(dim, (tuple, list)) or not all(isinstance(d, int) for d in dim) or not isinstance(keepdim, bool):
        return None
    if sorted(dim) not in ([2, 3], [-2, -1]):
        return None
    return "spatial" if keepdim else "vector"


def _clamps_zero_away(node: fx.Node, m: nn.Module | None) -> bool:
    """A hardtanh whose range leaves out 0 (``Hardtanh(0.1, 1)``): it maps a zero channel to a constant."""
    if isinstance(m, nn.Hardtanh):
        low, high = m.min_val, m.max_val
    elif node.op == "call_function" and node.target is F.hardtanh:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    else:
        return False
    return not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= 0 <= high)


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module], spatial: bool) -> bool:
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if _clamps_zero_away(node, m):
            return False
        return isinstance(m, _ELEMENTWISE_MODULES) or (spatial and isinstance(m, _SPATIAL_MODULES))
    if node.op == "call_function":
        if _clamps_zero_away(node, None):
            return False
        return node.target in _ELEMENTWISE_FUNCTIONS or (spatial and node.target in _SPATIAL_FUNCTIONS)
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return False


def _chain(
    start: fx.Node, channels: int, spatial: bool, modules: dict[str, nn.Module], calls: dict[str, int]
) -> _Chain | None:
    """The :class:`_Chain` of ``start`` (a producer's output with ``channels`` channels, spatial or not),
    or None when its output reaches anything a channel cannot be cut out of."""
    chain = _Chain()
    todo: list[tuple[fx.Node, str]] = [(start, "spatial" if spatial else "vector")]
    seen: set[fx.Node] = set()
    while todo:
        node, layout = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            others = (*user.args[1:], *user.kwargs.values())
            if not user.args or user.args[0] is not node or any(a is node for a in others):
                return None  # read as anything but the one input (a sum, a cat, a shape, the output)
            target = str(user.target)
            m = modules.get(target) if user.op == "call_module" else None
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)) and calls[target] != 1:
                return None  # its weights would be cut for every call (a shared ReLU module does not matter)
            if isinstance(m, nn.Conv2d) and layout == "spatial":
                if m.groups != 1 or m.in_channels != channels:
                    return None
                chain.readers.append((m, 1))
            elif isinstance(m, nn.Linear) and layout in ("vector", "flat"):
                per = m.in_features // channels
                if m.in_features % channels or (layout == "vector" and per != 1):
                    return None
                chain.readers.append((m, per))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and layout != "flat":
                if m.num_features != channels:
                    return None
                chain.norms.append(m)
                todo.append((user, layout))
            elif layout == "spatial" and _flatten_from_1(user, modules):
                todo.append((user, "flat"))
            elif layout == "spatial" and (pooled := _spatial_mean(user)) is not None:
                todo.append((user, pooled))
            elif _is_passthrough(user, modules, spatial=layout == "spatial"):
                todo.append((user, layout))
            else:
                return None
    return chain if chain.readers else None


def _dead(producer: nn.Module, norms: list[nn.Module]) -> Tensor:
    """Output channels that are exactly 0 after the producer and every BatchNorm on the way."""
    w = producer.weight.detach()
    dead = w.flatten(1).abs().amax(dim=1) == 0
    if producer.bias is not None:
        dead &= producer.bias.detach() == 0
    for norm in norms:
        if not norm.affine:
            return torch.zeros_like(dead)  # (0 - mean) / std is not 0
        dead &= (norm.weight.detach() == 0) & (norm.bias.detach() == 0)
    return dead


def _take(module: nn.Module, name: str, index: Tensor, dim: int) -> None:
    value = getattr(module, name)
    if value is None:
        return
    new = value.detach().index_select(dim, index.to(value.device)).clone()
    if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last) and not value.is_contiguous():
        new = new.contiguous(memory_format=torch.channels_last)  # index_select returns NCHW: keep the fast layout
    if isinstance(value, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=value.requires_grad))
    else:
        setattr(module, name, new)


def _entangled(model: nn.Module, graph: fx.Graph) -> set[int]:
    """Ids of the modules whose weights are used beyond their one traced call: a module registered under
    two names (one may be called where the trace cannot see, in an untraced module), a parameter or
    buffer tied to another module's, a weight read directly (``F.conv2d(x, self.conv.weight)``).
    Cutting one of them would change that other use."""
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    out = {i for i, n in counts.items() if n > 1}
    holders: dict[int, set[int]] = {}
    for m in model.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                holders.setdefault(id(t), set()).add(id(m))
    for ids in holders.values():
        if len(ids) > 1:
            out |= ids
    modules = dict(model.named_modules())
    for node in graph.nodes:
        owner = modules.get(str(node.target).rpartition(".")[0]) if node.op == "get_attr" else None
        if owner is not None:
            out.add(id(owner))
    return out


def _plans(model: nn.Module, graph: fx.Graph) -> dict[str, tuple[nn.Module, _Chain, Tensor]]:
    """Every producer of ``graph`` with channels to cut: ``{name: (producer, chain, channels kept)}``."""
    modules = dict(model.named_modules())
    entangled = _entangled(model, graph)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    plans: dict[str, tuple[nn.Module, _Chain, Tensor]] = {}
    for node in graph.nodes:
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or calls[str(node.target)] != 1:
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            continue
        channels = m.weight.shape[0]
        chain = _chain(node, channels, isinstance(m, nn.Conv2d), modules, calls)
        if chain is None or any(id(x) in entangled for x in (m, *chain.norms, *(r for r, _ in chain.readers))):
            continue
        keep = (~_dead(m, chain.norms)).nonzero().flatten()
        if len(keep) == channels:
            continue
        if len(keep) == 0:
            keep = torch.zeros(1, dtype=torch.long, device=keep.device)  # a zero-width layer is not a layer
        plans[str(node.target)] = (m, chain, keep)
    return plans


def _same_chain(a: _Chain, b: _Chain) -> bool:
    return {id(n) for n in a.norms} == {id(n) for n in b.norms} and {(id(r), per) for r, per in a.readers} == {
        (id(r), per) for r, per in b.readers
    }


def _graph_in_mode(model: nn.Module, training: bool) -> fx.Graph | None:
    """``model`` traced as ``model.train(training)`` runs it (tracing fixes ``if self.training:`` branches),
    every module's mode restored afterwards."""
    with module_mode(model, training):
        return trace(model)[0]


@torch.no_grad()
def slim_(model: nn.Module) -> dict[str, Any]:
    """Remove, in place, every output channel that is exactly 0 and can be cut out without changing any
    output (see the module docstring), in training as in evaluation mode. Returns ``{"layers": {name:
    [channels before, after]}, "parameters": [before, after], "untraced": [...]}``. ``model`` must hold
    plain weights: a merged model (``merge_``, or a module loaded from ``model.pt``)."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("slim_ needs plain weights: merge the reparameterization first (merge_) or load model.pt")
    params_before = sum(p.numel() for p in model.parameters())
    graph, opaque = trace(model)
    names = {id(m): n for n, m in model.named_modules()}
    untraced = sorted(names[i] or "<root>" for i in opaque if i in names)
    if graph is None:
        return {"layers": {}, "parameters": [params_before, params_before], "untraced": untraced}
    plans = _plans(model, graph)
    for training in (False, True):  # a branch taken in one mode only (an auxiliary head) must still fit
        if plans and any(m.training != training for m in model.modules()):
            other = _graph_in_mode(model, training)
            found = {} if other is None else _plans(model, other)
            plans = {k: v for k, v in plans.items() if k in found and _same_chain(v[1], found[k][1])}
    layers: dict[str, list[int]] = {}
    for name, (producer, chain, keep) in plans.items():  # indices were all taken from the unmodified model
        layers[name] = [producer.weight.shape[0], len(keep)]
        _take(producer, "weight", keep, 0)
        _take(producer, "bias", keep, 0)
        if isinstance(producer, nn.Conv2d):
            producer.out_channels = len(keep)
        else:
            producer.out_features = len(keep)
        for norm in chain.norms:
            for key in ("weight", "bias", "running_mean", "running_var"):
                _take(norm, key, keep, 0)
            norm.num_features = len(keep)
        for reader, per in chain.readers:
            cols = (keep[:, None] * per + torch.arange(per, device=keep.device)).flatten()
            _take(reader, "weight", cols, 1)
            if isinstance(reader, nn.Conv2d):
                reader.in_channels = len(keep)
            else:
                reader.in_features = len(cols)
    params_after = sum(p.numel() for p in model.parameters())
    return {"layers": layers, "parameters": [params_before, params_after], "untraced": untraced}


def example_images(loader: Iterable[Any], n: int = 8) -> Tensor:
    """The first ``n`` images of ``loader`` on the CPU, where a model is slimmed and checked (GPU-resident
    test data included)."""
    return next(iter(loader))[0][:n].cpu()


@torch.no_grad()
def macs_per_image(model: nn.Module, example: Tensor) -> tuple[Tensor, int]:
    """``model(example)`` and the multiply-accumulates of its Conv2d and Linear layers per image (dense
    count: zero weights are counted, as a dense runtime computes them). Module calls only: a functional
    projection (the attention of a ViT) is not counted, so the figure is for convolutional networks."""
    total = 0

    def count(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        per_output = m.weight[0].numel()  # in_channels / groups * kernel area, or in_features
        total += out.numel() // out.shape[0] * per_output

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        out = model(example)
    finally:
        for h in handles:
            h.remove()
    return out, total


@torch.no_grad()
def slim(model: nn.Module, example: Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`slim_` on a copy of ``model``, checked: the copy's outputs on ``example`` must equal the
    original's (else ``RuntimeError``: a pattern the rules above misjudge must not ship silently).
    The check runs both in evaluation mode (deterministic: no dropout, and a training-mode BatchNorm
    would update ``model``'s running statistics); the modules' modes are restored afterwards. A half or
    bfloat16 model is compared to a few units in the last place of its largest output (a narrower
    layer sums in another order). The report also gets ``macs``: multiply-accumulates per image,
    [before, after]."""
    small = copy.deepcopy(model)
    report = slim_(small)
    with eval_mode(model), eval_mode(small):
        (full, macs_before), (cut, macs_after) = macs_per_image(model, example), macs_per_image(small, example)
    report["macs"] = [macs_before, macs_after]
    scale = float(full.abs().max()) if full.is_floating_point() and full.numel() else 0.0
    if math.isfinite(scale):  # (an inf output must not make the check vacuous)
        atol = max(atol, 4 * torch.finfo(full.dtype).eps * scale)
    if not torch.allclose(cut, full, rtol=rtol, atol=atol):
        diff = float((cut - full).abs().max())
        raise RuntimeError(
            f"slim: cutting {sorted(report['layers'])[:3]}... changed the outputs (max |diff| {diff:.3g}); "
            "the model is left as it was. Please report the architecture."
        )
    return small, report


def save_program(model: nn.Module, path: str | os.PathLike[str], example: Tensor) -> None:
    """``model`` (in its current mode, normally ``eval()``) as a ``torch.export`` program with a free batch
    size, written atomically: ``torch.export.load(path).module()(x)`` runs it without frep-lightning,
    and it is what ExecuTorch and other edge runtimes take."""
    batch = torch.export.Dim("batch", min=1)
    example = example[:2] if len(example) >= 2 else example.expand(2, *example.shape[1:])  # 1 would specialise
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    atomic_write_bytes(path, lambda f: torch.export.save(program, f))
