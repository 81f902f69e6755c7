"""Weight reparameterization (paper Sec. III-B): W = W1 * W2 (FReP) or W = M @ W2 (FReP-CH).

Every prunable layer gets a ``torch.nn.utils.parametrize`` parametrization on ``weight`` that
also owns the layer's pruning ``mask`` buffer (all ones until pruning). Giving every layer its
mask from the start keeps the live model and any averaged copy structurally identical, so
position-based weight averaging (Lightning's ``WeightAveraging``) never misaligns, and the
state_dict keys do not change when pruning happens.

``merge_`` removes the parametrizations and leaves plain ``weight`` parameters equal to the
masked product, so the exported model is an ordinary torchvision-style module.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from frep_lightning.checks import check_choice, check_patterns

KINDS = ("hadamard", "channel", "none")
INITS = ("random", "equal", "ones", "sqrt")
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


class MaskedWeight(nn.Module):
    """Base parametrization: holds the 0/1 pruning mask; subclasses define the product."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape))

    def product(self, *factors: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, *factors: Tensor) -> Tensor:
        return self.product(*factors) * self.mask


class Plain(MaskedWeight):
    """No reparameterization, only the mask (method ``ori``/drop-in pruning of plain layers)."""

    def product(self, weight: Tensor) -> Tensor:
        return weight

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight


class Hadamard(MaskedWeight):
    """FReP, Eq. 4: W = W1 ⊙ W2 with W1, W2 of the weight's shape."""

    def product(self, w1: Tensor, w2: Tensor) -> Tensor:
        return w1 * w2

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        # An exact-magnitude split so that ``module.weight = X`` keeps meaning "set W to X".
        root = weight.abs().sqrt()
        return torch.sign(weight) * root, root


class Channel(MaskedWeight):
    """FReP-CH, Eq. 9: W = M · W2 over output channels, M ∈ R^{D×D}."""

    def product(self, m: Tensor, w2: Tensor) -> Tensor:
        return (m @ w2.flatten(1)).view_as(w2)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        d = weight.shape[0]
        return torch.eye(d, dtype=weight.dtype, device=weight.device), weight


_PARAMETRIZATIONS: dict[str, type[MaskedWeight]] = {"hadamard": Hadamard, "channel": Channel, "none": Plain}


def select_layers(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """Conv2d/Linear layers whose qualified name matches ``include`` and none of ``exclude``."""
    include, exclude = check_patterns("include", include), check_patterns("exclude", exclude)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):  # parametrized layers subclass their original type
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        chosen.append((name, module))
    return chosen


def weight_parametrization(module: nn.Module) -> MaskedWeight | None:
    """The frep parametrization on ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, MaskedWeight):
            return p
    return None


def iter_masked(model: nn.Module) -> Iterator[tuple[str, nn.Module, MaskedWeight]]:
    """(name, layer, parametrization) for every layer carrying a frep mask."""
    for name, module in model.named_modules():
        p = weight_parametrization(module)
        if p is not None:
            yield name, module, p


def factors(module: nn.Module) -> list[Tensor]:
    """The trainable tensors behind ``module.weight`` (one for ``Plain``, two otherwise)."""
    plist = module.parametrizations["weight"]
    if plist.is_tensor:
        return [plist.original]
    return [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


def _init_factors(module: nn.Module, w0: Tensor, kind: str, init: str, generator: torch.Generator | None) -> None:
    """Paper Sec. IV-E inits, from the layer's initial weight ``w0``. ``random``: both factors are
    drawn from the layer's own init distribution (W2 is a random permutation of ``w0``'s entries,
    so any model-specific init scheme is respected); ``equal``: W2 = |W1|; ``ones``: W2 = 1.
    ``sqrt`` (not in the paper): W1 = sign(w0)·sqrt|w0|, W2 = sqrt|w0|, so W1·W2 = ``w0`` with equal
    magnitudes (Sec. III-B's assumption): a pretrained backbone keeps its function.
    FReP-CH: W2 = ``w0`` and M is random (``nn.Linear(D, D)``'s init) or the identity (``ones``)."""
    first, second = factors(module)
    with torch.no_grad():
        if kind == "hadamard" and init != "ones" and not bool(w0.any()):
            # A zero-initialised layer (torchvision's ViT head): W1 = W2 = 0 is a saddle of W1*W2 where neither
            # factor ever gets a gradient, and no layer before it either. Draw from the Conv2d/Linear default
            # init instead; ``sqrt`` keeps W = 0 (W1 = 0, W2 = |draw|) and still trains.
            drawn = nn.init.kaiming_uniform_(torch.empty(w0.shape), a=math.sqrt(5), generator=generator).to(w0)
            if init == "sqrt":
                first.zero_()
                second.copy_(drawn.abs())
                return
            w0 = drawn
        if kind == "hadamard":
            first.copy_(w0)
            if init == "random":
                flat = w0.flatten()
                perm = torch.randperm(flat.numel(), generator=generator).to(flat.device)
                second.copy_(flat[perm].view_as(w0))
            elif init == "equal":
                second.copy_(w0.abs())
            elif init == "sqrt":
                root = w0.abs().sqrt()
                first.copy_(torch.where(w0 < 0, -root, root))
                second.copy_(root)
            else:  # ones
                second.fill_(1.0)
        else:
            d = first.shape[0]
            if init == "random":
                bound = 1.0 / math.sqrt(d)
                first.copy_(torch.empty(d, d).uniform_(-bound, bound, generator=generator).to(first))
            elif init == "ones":
                first.copy_(torch.eye(d, dtype=first.dtype, device=first.device))
            else:
                raise ValueError(
                    f"reparam.init={init!r} is defined for reparam.kind='hadamard' only; use random or ones "
                    "(ones keeps the layer's function)"
                )
            second.copy_(w0)


def reparameterize_(
    model: nn.Module,
    kind: str = "hadamard",
    init: str = "random",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    seed: int | None = None,
) -> nn.Module:
    """Register the ``kind`` parametrization (with an all-ones mask) on every selected layer.

    Layers already parametrized by frep with the same ``kind`` are left alone, so the call is
    idempotent (``kind="none"``, mask only, accepts any). A layer that already has another kind
    is an error: e.g. ``RobustPruning`` gave it a mask-only parametrization at setup because the
    model was reparameterized later (in ``setup()``/``configure_model()``), after the averaged
    copy and the masks were made; reparameterize in the module's ``__init__``.
    """
    check_choice("reparam.kind", kind, KINDS)
    check_choice("reparam.init", init, INITS)
    selected = select_layers(model, include, exclude)
    if kind != "none":
        other = [(n, type(p).__name__) for n, m in selected if (p := weight_parametrization(m)) is not None
                 and not isinstance(p, _PARAMETRIZATIONS[kind])]  # fmt: skip
        if other:
            names = ", ".join(f"{n} ({k})" for n, k in other[:3]) + (" ..." if len(other) > 3 else "")
            raise ValueError(
                f"reparameterize_(kind={kind!r}): {len(other)} layer(s) already carry another frep parametrization: "
                f"{names}. RobustPruning/TemporalEnsemble give plain layers a mask at setup; call reparameterize_ "
                "in the LightningModule's __init__, before the Trainer sets it up"
            )
    layers = [(n, m) for n, m in selected if weight_parametrization(m) is None]
    if not layers and not list(iter_masked(model)):
        raise ValueError(
            "reparameterize_: no Conv2d/Linear layer matches pruning.include/exclude "
            f"(include={list(include)}, exclude={list(exclude)})"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    for _, module in layers:
        w0 = module.weight.detach().clone()
        cls = _PARAMETRIZATIONS[kind]
        parametrize.register_parametrization(module, "weight", cls(w0.shape).to(w0))
        if kind != "none":
            _init_factors(module, w0, kind, init, generator)
    return model


def add_masks_(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> nn.Module:
    """Give plain selected layers a mask-only parametrization (no-op for reparameterized ones)."""
    return reparameterize_(model, kind="none", include=include, exclude=exclude)


def merge_(model: nn.Module) -> nn.Module:
    """Replace every frep parametrization by a plain ``weight`` equal to the masked product.

    ``parametrize.remove_parametrizations`` deletes the property from the injected class, which
    ``copy.deepcopy`` shares between a model and its copies (merging a copy would break the
    original), so the class is swapped per instance here instead.
    """
    for _, module, _ in list(iter_masked(model)):
        with torch.no_grad():
            merged = module.weight.detach().clone()
        cls = type(module)
        del module.parametrizations["weight"]
        if len(module.parametrizations) == 0:
            del module.parametrizations
            module.__class__ = cls.__bases__[0]
        else:  # other tensors stay parametrized: a private class without the weight property
            attrs = {k: v for k, v in cls.__dict__.items() if k != "weight"}
            module.__class__ = type(cls.__name__, cls.__bases__, attrs)
        module.weight = nn.Parameter(merged)
        # Conv/Linear declare weight before bias: restore that order (state_dict, parameters()).
        params = module._parameters
        module._parameters = type(params)([("weight", params.pop("weight")), *params.items()])
    return model


def merge(model: nn.Module) -> nn.Module:
    """A merged copy of ``model`` (plain modules, identical outputs); ``model`` is left as it is."""
    return merge_(copy.deepcopy(model))


reparameterize = reparameterize_


def merged_weights(model: nn.Module) -> dict[str, Tensor]:
    """Effective (masked, merged) weight of every masked layer, without modifying the model."""
    with torch.no_grad():
        return {name: module.weight.detach() for name, module, _ in iter_masked(model)}


def kept_per_mask(model: nn.Module) -> list[int]:
    """Entries kept by each pruning mask of ``model`` (one host sync): it changes exactly when pruning
    installs new masks, which is what the ensemble's BN statistics and the overfitting watch look for."""
    counts = [p.mask.count_nonzero() for _, _, p in iter_masked(model)]
    return torch.stack(counts).tolist() if counts else []


@torch.no_grad()
def mask_with_state_(tensor: Tensor, mask: Tensor, optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
    """``tensor *= mask``, and the same for every optimizer state tensor of ``tensor`` (momentum, Adam's
    moments), so that neither momentum nor a moment estimate revives a zeroed entry."""
    tensor.mul_(mask.to(tensor))
    for opt in optimizers:
        for value in opt.state.get(tensor, {}).values():
            if isinstance(value, Tensor) and value.shape == tensor.shape:
                value.mul_(mask.to(value))


def factor_masks(p: MaskedWeight, mask: Tensor) -> tuple[Tensor | None, ...]:
    """Per-factor masks implied by a weight mask: entries of the factors that can only feed
    pruned weights. Zeroing them (and their optimizer state) keeps pruned weights exactly zero
    under momentum and weight decay and makes the factors agree with the merged model."""
    if isinstance(p, Hadamard):
        return mask, mask
    if isinstance(p, Plain):
        return (mask,)
    if isinstance(p, Channel):
        rows = mask.flatten(1).amax(dim=1)  # 1 where the output channel keeps any weight
        structured = bool(torch.equal(mask.flatten(1), rows[:, None].expand_as(mask.flatten(1))))
        if structured:
            return rows[:, None].expand(p.mask.shape[0], p.mask.shape[0]).contiguous(), None
        return None, None
    return ()
