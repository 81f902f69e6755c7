"""Structured pruning that removes channels, not only filters (paper Eq. 17, made deployable).

Masking a conv's output channel zeroes the conv's output there, but the layer's own ``bias`` and a
BatchNorm reading that output still add a constant: in training mode BN maps the all-zero channel
to its β, so the "pruned" channel carries ReLU(β) into the next layer and the filter cannot be
physically removed from the exported model. Here the *dependents* of every pruned output channel
are held at exactly zero too:

- the pruned layer's ``bias`` entry;
- ``weight`` (γ) and ``bias`` (β) of every BatchNorm whose input is the layer's output, found by
  tracing the model with ``torch.fx`` (a BN after a residual addition reads other channels too and
  is never paired: pre-activation WRN blocks stay correct). Every call of the BN must read the
  layer's output as the layer computed it: a BN shared with another input, or reading a tensor
  written in place before it (``y.add_(z)``), normalises live channels there and is not paired.

They are zeroed, with their optimizer state, in the live model and in every averaged copy when the
mask is installed, and a gradient hook multiplies their gradients by the channel mask, read from
the layer's mask buffer at every backward (so a resumed run, the fast path's captured step and a
gradually growing mask all hold them at zero with no extra state). With γ = β = 0 the BN output of
the channel is exactly 0 in training and in evaluation mode, whatever its running statistics.

Not removed (the channel still carries a constant, as with filter-only masking): a BN that reads
the channel through anything else first (a concatenation as in DenseNet, an activation, a pool),
a BN without affine parameters, and a layer whose zero output is not "nothing", such as the
excitation conv of a squeeze-and-excitation block (its gate is sigmoid(0) = 0.5).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from frep_lightning.reparam import iter_masked, mask_with_state_, weight_parametrization

_NORMS = (nn.modules.batchnorm._BatchNorm,)


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer that keeps the modules it cannot trace (``opaque``) as opaque calls."""

    def __init__(self, opaque: set[int]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.opaque or super().is_leaf_module(m, module_qualified_name)


def _graph(model: nn.Module, opaque: set[int]) -> fx.Graph | None:
    try:
        return _Tracer(opaque).trace(model)
    except Exception:  # any tracing failure makes the module opaque
        return None


def _find_opaque(model: nn.Module, opaque: set[int]) -> None:
    """Post-order: the smallest modules whose own forward ``torch.fx`` cannot trace, into ``opaque``."""
    for child in model.children():
        if not fx.Tracer().is_leaf_module(child, ""):
            _find_opaque(child, opaque)
    if _graph(model, opaque) is None:
        opaque.add(id(model))


def trace(model: nn.Module) -> tuple[fx.Graph | None, set[int]]:
    """``model``'s ``torch.fx`` graph with the modules that cannot be traced kept whole (their ids are the
    second item); None if even that fails (the model's own forward cannot be traced)."""
    opaque: set[int] = set()
    graph = _graph(model, opaque)
    if graph is None:  # the common case traces whole at the first try
        _find_opaque(model, opaque)
        graph = _graph(model, opaque)
    return graph, opaque


# Tensors that may share storage with their input: an in-place write into one of them changes it.
_VIEWS = frozenset(
    (
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "squeeze",
        "unsqueeze", "expand", "expand_as", "narrow", "select", "split", "split_with_sizes", "tensor_split", "chunk",
        "unbind", "t", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "as_strided", "detach",
        "contiguous", "unfold", "getitem", "getattr",
    )
)  # fmt: skip
_INPLACE_OPERATORS = frozenset(
    (
        operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
        operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
        operator.ilshift, operator.irshift,
    )
)  # fmt: skip


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _writes_into(user: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``user`` may write into ``value`` in place (``y.add_(z)``, ``y[i] = z``, ``y += z``,
    ``relu(y, inplace=True)``, ``out=y``): fx records it, but readers of ``value`` keep pointing at it."""
    if user.kwargs.get("out") is value:
        return True
    if not user.args or user.args[0] is not value:
        return False
    if user.op == "call_module":
        return getattr(modules.get(str(user.target)), "inplace", False) is True
    if user.op not in ("call_method", "call_function"):
        return False
    name = _name(user)
    return (
        user.target in _INPLACE_OPERATORS
        or (name.endswith("_") and not name.endswith("__"))
        or user.kwargs.get("inplace") is True
    )


def _reads_unchanged(src: fx.Node, reader: fx.Node, order: dict[fx.Node, int], modules: dict[str, nn.Module]) -> bool:
    """Whether ``src``'s output reaches ``reader`` as it was computed: nothing writes into it, or into a
    view of it, before ``reader`` runs (in-place ops after it do not change what it read)."""
    aliases, seen = [src], {src}
    while aliases:
        value = aliases.pop()
        for user in value.users:
            if user is reader or order[user] > order[reader]:
                continue
            if _writes_into(user, value, modules):
                return False
            if user.op in ("call_method", "call_function") and _name(user) in _VIEWS and user not in seen:
                seen.add(user)
                aliases.append(user)
    return True


def _trace_reads(
    model: nn.Module, prefix: str, opaque: set[int], reads: dict[int, set[int | None]], untraced: list[str]
) -> None:
    """For every BatchNorm call over ``model``: ``reads[id(norm)]`` gets the id of the module whose
    output it reads unchanged, or None (any other input). A module in ``opaque`` is looked into child
    by child (its own code, between them, is unseen: its name goes into ``untraced``)."""
    modules = dict(model.named_modules())
    graph = None if id(model) in opaque else _graph(model, opaque)
    if graph is None:
        if type(model).forward is not nn.Module.forward:  # a container without forward has no code to miss
            untraced.append(f"{prefix.rstrip('.') or '<root>'} ({type(model).__name__})")
        for name, child in model.named_children():
            _trace_reads(child, f"{prefix}{name}.", opaque, reads, untraced)
        return
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in modules:
            continue
        module = modules[node.target]
        if id(module) in opaque:
            _trace_reads(module, f"{prefix}{node.target}.", opaque, reads, untraced)
        elif isinstance(module, _NORMS):
            src = node.args[0] if node.args else node.kwargs.get("input")
            direct = (
                isinstance(src, fx.Node)
                and src.op == "call_module"
                and src.target in modules
                and _reads_unchanged(src, node, order, modules)
            )
            reads.setdefault(id(module), set()).add(id(modules[src.target]) if direct else None)


def _matches(norm: nn.Module, channels: int) -> bool:
    return bool(norm.affine) and norm.num_features == channels


def channel_dependents(model: nn.Module, layers: Sequence[str]) -> dict[str, list[str]]:
    """For each of ``layers`` (masked Conv2d/Linear names), the affine BatchNorm layers that read its
    output directly and have one feature per output channel. A BatchNorm called more than once is
    paired only if every call reads that layer's output: zeroing its γ/β would otherwise also zero
    the channel where it normalises something else. Warns when part of ``model`` could not be traced
    (a BN there after a pruned layer would keep its β)."""
    _, opaque = trace(model)
    reads: dict[int, set[int | None]] = {}
    untraced: list[str] = []
    _trace_reads(model, "", opaque, reads, untraced)
    names = {id(m): n for n, m in model.named_modules()}  # one name per module, however it is reached
    pairs: dict[int, list[str]] = {}
    for norm, sources in reads.items():
        if len(sources) == 1 and None not in sources:
            pairs.setdefault(next(iter(sources)), []).append(names[norm])
    out: dict[str, list[str]] = {}
    for name in layers:
        layer = model.get_submodule(name)
        found = pairs.get(id(layer), [])
        out[name] = [n for n in found if _matches(model.get_submodule(n), layer.weight.shape[0])]
    if untraced:
        rank_zero_warn(
            f"pruning.remove_channels: torch.fx could not trace {', '.join(untraced[:3])}"
            f"{' ...' if len(untraced) > 3 else ''}; a BatchNorm reached only through its own forward() code "
            "is not found and keeps its β on pruned channels"
        )
    return out


def dependent_tensors(model: nn.Module, layer: str, norms: Sequence[str]) -> list[Tensor]:
    """The per-output-channel parameters of ``layer`` and of its ``norms``: bias, γ, β (those that exist)."""
    tensors = []
    for name in (layer, *norms):
        module = model.get_submodule(name)
        if name != layer and isinstance(module.weight, Tensor):
            tensors.append(module.weight)
        if isinstance(getattr(module, "bias", None), Tensor):
            tensors.append(module.bias)
    return tensors


def channel_keep(mask: Tensor) -> Tensor:
    """1 for every output channel of a weight mask that keeps any weight, else 0."""
    return mask.flatten(1).amax(dim=1)


@torch.no_grad()
def zero_dependents_(
    model: nn.Module,
    dependents: dict[str, list[str]],
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> int:
    """Zero the dependents of every pruned channel of ``model`` (masks read from its layers), and the
    same entries of every optimizer state tensor of those parameters; returns how many parameter
    entries were not zero yet (one host sync)."""
    masks = {name: p.mask for name, _, p in iter_masked(model)}
    found: list[Tensor] = []
    for layer, norms in dependents.items():
        keep = channel_keep(masks[layer])
        for tensor in dependent_tensors(model, layer, norms):
            found.append(((tensor != 0) & (keep == 0).to(tensor.device)).sum())
            mask_with_state_(tensor, keep, optimizers)
    return int(torch.stack([f.to(found[0].device) for f in found]).sum()) if found else 0


def _held_by(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    """A gradient hook: ``grad`` times ``layer``'s channel mask, looked up at every backward (moving the
    model to a device replaces the mask buffer); once ``layer`` is merged (no mask), ``grad`` unchanged:
    training the merged model must not find parameters frozen by a mask it no longer has."""

    def hook(grad: Tensor) -> Tensor:
        p = weight_parametrization(layer)
        return grad if p is None else grad * channel_keep(p.mask).to(grad.dtype)

    return hook


def hold_dependents(model: nn.Module, dependents: dict[str, list[str]]) -> list[RemovableHandle]:
    """Gradient hooks that keep the dependents of pruned channels at zero: each gradient is multiplied
    by its layer's channel mask, read from the mask buffer at every backward (all ones before pruning)."""
    handles = []
    for layer, norms in dependents.items():
        hook = _held_by(model.get_submodule(layer))
        for tensor in dependent_tensors(model, layer, norms):
            if tensor.requires_grad:
                handles.append(tensor.register_hook(hook))
    return handles
