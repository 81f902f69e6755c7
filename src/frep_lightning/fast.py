"""The fast training path: FReP's training step, unchanged, captured whole in one CUDA graph.

Why: on an H100 an eager FReP step of a CIFAR ResNet-18 at batch 128 is launch-bound (~41 ms,
and batch 512 costs the same); replaying the same step from a CUDA graph removes the launch
cost (~11 ms with bf16 autocast and channels_last). The step is the one of
:class:`~frep_lightning.module.FReP` (clean forward, random start + signed gradient step on the
objective's attack loss, adversarial forward, objective, SGD), with nothing changed:

- the SGD update is ``torch.optim.SGD``'s own arithmetic (:func:`sgd_update_`, foreach or the
  fused kernel) on the optimizer's own momentum buffers, so checkpoints, pruning (which zeroes
  factors *and* their momentum via :func:`~frep_lightning.pruning.apply_masks_`) and resuming
  see a normal SGD state;
- the learning rate lives in a device tensor refreshed from ``param_groups`` whenever the
  scheduler changes it, so an LR drop needs no re-capture;
- masks are buffers written in place by :class:`~frep_lightning.pruning.RobustPruning`, and the
  ensemble swap copies in place, so the graph reads the new values without a re-capture;
- loss and accuracies are summed on the device and read once per epoch (no host sync in a step);
  a non-finite loss is counted there and raised at the end of the epoch.

Options that keep the numbers (or change only their rounding) to fill the GPU further at batch 128:
``streams=2`` (the clean forward and its backward on a second stream, beside the attack's forward and
the adversarial branch), ``cache_weights`` (every W1*W2*mask once per step, two multi-tensor kernels)
and ``compile_model`` (inductor's fused kernels inside the same graph); ``experiments/bench.py``
times each.

A fingerprint of every storage pointer the graph touches (parameters, buffers, momentum buffers)
and of the hyper-parameters baked into it (momentum, weight decay, objective, attack) is checked
before each replay; any change re-captures the step. Warm-up steps (``warmup_steps``, run
eagerly on a side stream as CUDA graph capture requires) are real training steps.

Lightning stays the driver: :class:`FastFReP` is FReP with manual optimization whose
``training_step`` calls the LightningOptimizer's ``step`` with a closure that runs (or replays)
the whole step; the torch optimizer itself then finds no ``.grad`` and does nothing, while
Lightning advances ``global_step`` and runs the optimizer-step hooks as usual. LR schedulers are
stepped here at the point where automatic optimization steps them (manual optimization leaves
that to the module).

On a CPU (or ``capture=none``) the same step runs eagerly; ``tests/test_equivalence.py`` checks
that it gives the weights, masks and ensemble of the plain path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parametrize

from frep_lightning.attacks import PRECISIONS, SignGradientAttack
from frep_lightning.checks import check_choice, check_int
from frep_lightning.module import (
    SUM_CORRECT_ADV,
    SUM_CORRECT_CLEAN,
    SUM_COUNT,
    SUM_LOSS,
    SUM_NONFINITE,
    FReP,
    sum_means,
)
from frep_lightning.objectives import Objective
from frep_lightning.reparam import Hadamard, Plain, factors, iter_masked

log = logging.getLogger("frep_lightning")

CAPTURES = ("cuda_graph", "compile", "none")
SGD_IMPLS = ("auto", "fused", "foreach")


def _check_compile_model(compile_model: bool, capture: str, cache_weights: bool) -> None:
    if compile_model and capture == "compile":
        raise ValueError(
            "fast.compile_model=true with fast.capture=compile would compile the model twice; use "
            "fast.capture=cuda_graph (compiled kernels replayed from one graph) or fast.capture=none"
        )
    if compile_model and cache_weights:
        raise ValueError(
            "fast.compile_model=true and fast.cache_weights=true: pick one (the compiled forward fuses the "
            "W1*W2*mask products itself; the two are not tested together)"
        )


def _check_streams(streams: int, capture: str, attack: SignGradientAttack | None = None) -> None:
    if isinstance(streams, bool) or streams not in (1, 2):
        raise ValueError(f"fast.streams={streams!r} must be 1 or 2")
    if streams == 2 and capture == "compile":
        raise ValueError(
            "fast.streams=2 with fast.capture=compile: torch.compile would have to trace the stream switches of the "
            "step; use fast.capture=cuda_graph (the streams are kept in the captured graph)"
        )
    if streams == 2 and attack is not None and getattr(attack, "bn", "train") != "train":
        raise ValueError(
            f"fast.streams=2 needs method.attack.bn=train (got {attack.bn!r}): with bn=eval the attack's forward "
            "reads the BatchNorm running statistics that the concurrent clean forward updates"
        )


@torch.no_grad()
def sgd_update_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    impl: str = "foreach",
) -> None:
    """``torch.optim.SGD``'s update (dampening 0, not maximizing) on existing momentum buffers.

    ``lr`` may be a float or a 0-dim tensor on the parameters' device (what a captured step uses,
    so a new LR needs no re-capture). A zero momentum buffer gives exactly SGD's first step
    (``buf = grad``), so buffers can be allocated before the first step. ``impl='fused'`` is
    ``torch._fused_sgd_`` (one kernel), ``foreach`` the multi-tensor path of ``torch.optim.SGD``.
    """
    if not params:
        return
    if impl == "fused":
        torch._fused_sgd_(
            params,
            grads,
            momentum_buffers if momentum != 0 else [],
            weight_decay=weight_decay,
            momentum=momentum,
            lr=lr,
            dampening=0.0,
            nesterov=nesterov,
            maximize=False,
            is_first_step=False,
        )
        return
    if impl != "foreach":
        raise ValueError(f"fast.sgd={impl!r} is not valid; allowed values: fused, foreach")
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_add_(momentum_buffers, grads)
        grads = torch._foreach_add(grads, momentum_buffers, alpha=momentum) if nesterov else momentum_buffers
    if isinstance(lr, Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(grads, lr))
    else:
        torch._foreach_add_(params, grads, alpha=-lr)


def _products_by_kind(model: nn.Module) -> tuple[list[tuple], list[tuple], list[nn.Module]]:
    """The masked layers as ``(module, W1, W2, mask)`` (Hadamard), ``(module, W, mask)`` (mask only) and
    the rest (FReP-CH), for :meth:`FastStep._fill_weight_cache`."""
    hadamard: list[tuple] = []
    plain: list[tuple] = []
    other: list[nn.Module] = []
    for _, module, p in iter_masked(model):
        if isinstance(p, Hadamard):
            hadamard.append((module, *factors(module), p.mask))
        elif isinstance(p, Plain):
            plain.append((module, *factors(module), p.mask))
        else:
            other.append(module)
    return hadamard, plain, other


def _weight_cache_keys(modules: Sequence[nn.Module]) -> list[Any]:
    """The key under which ``parametrize.cached()`` files each module's ``weight``, found by letting it file
    one (no grad). Not simply ``(id(module), "weight")``: torch keys by the module the property was made
    for, which for a ``copy.deepcopy`` of a parametrized model is the original's (the injected class and
    its closure are shared). Two layers under one key (deep copies inside one model) would read each
    other's weights from the cache: refused."""
    keys: list[Any] = []
    with torch.no_grad(), parametrize.cached():
        for module in modules:
            before = set(parametrize._cache)
            module.weight  # noqa: B018
            new = set(parametrize._cache) - before
            if len(new) != 1:
                raise ValueError(
                    f"fast.cache_weights=true: {type(module).__name__} layer shares its parametrization cache entry "
                    "with another layer (deep copies of one parametrized layer in one model); set "
                    "fast.cache_weights=false"
                )
            keys.append(new.pop())
    return keys


@dataclass
class _Group:
    """One optimizer param group as the step sees it (params that take part, their buffers)."""

    params: list[Tensor]
    buffers: list[Tensor]
    momentum: float
    weight_decay: float
    nesterov: bool


@dataclass
class _Captured:
    """A captured step for one batch shape: its graph, static inputs and what it was captured against."""

    warm: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph
    x: Tensor | None = None
    y: Tensor | None = None
    fingerprint: tuple | None = None


class FastStep:
    """One FReP training step, run eagerly, replayed from a CUDA graph, or through ``torch.compile``.

    Args:
        model: the (reparameterized) backbone; trained in place.
        objective, attack: as in :class:`~frep_lightning.module.FReP`.
        optimizer: a ``torch.optim.SGD`` over ``model``'s parameters (its state holds the momentum).
        capture: ``cuda_graph`` (whole step in one graph), ``compile`` (``torch.compile``,
            ``mode="reduce-overhead"``) or ``none`` (eager). Off CUDA, always eager.
        precision: ``fp32`` or ``bf16`` (autocast around the forwards; the update stays fp32).
        sgd: ``fused``, ``foreach``, or ``auto`` (fused on CUDA, foreach elsewhere).
        cache_weights: compute every W = W1·W2·mask once per step, all layers in two multi-tensor
            kernels, and let the three forwards read them (``parametrize.cached``), instead of once
            per layer and forward; the same values, gradients summed in another order (rounding only).
        compile_model: run the backbone's forwards (and their backwards) through ``torch.compile``
            (inductor, its default mode: no CUDA graphs of its own), so that BatchNorm/ReLU/residual
            adds and the W1·W2·mask products become fused kernels; with ``capture=cuda_graph`` the whole
            step, compiled kernels included, is then captured as before. Rounding-level change only.
        streams: 2 runs the clean forward on a second CUDA stream, alongside the attack's forward (which
            does not need the clean output until its loss), so that in the captured graph the two bs-sized
            forwards, and later the backwards of the clean and adversarial branches, can fill the GPU together.
            The same operations in the same order per stream: no numerical change (the attack's forward
            touches no BatchNorm running statistics, :func:`~frep_lightning.attacks.frozen_bn_stats`).
            Off CUDA, or for an objective without a clean forward, 1 stream.
        warmup_steps: eager steps (real training steps) per batch shape before capturing.
        memory_format: layout the inputs are given (``torch.channels_last`` with a channels-last model).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        attack: SignGradientAttack,
        optimizer: torch.optim.Optimizer,
        *,
        capture: str = "cuda_graph",
        precision: str = "fp32",
        sgd: str = "auto",
        cache_weights: bool = False,
        compile_model: bool = False,
        streams: int = 1,
        warmup_steps: int = 3,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        check_choice("fast.capture", capture, CAPTURES)
        _check_compile_model(compile_model, capture, cache_weights)
        _check_streams(streams, capture, attack)
        check_choice("fast.precision", precision, PRECISIONS)
        check_choice("fast.sgd", sgd, SGD_IMPLS)
        warmup_steps = check_int("fast.warmup_steps", warmup_steps, 1)  # capture needs a warm-up
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(
                f"the fast path re-implements torch.optim.SGD's update inside the captured step; got "
                f"{type(optimizer).__name__} (use fast.enabled=false with other optimizers)"
            )
        for i, group in enumerate(optimizer.param_groups):
            if group.get("dampening", 0) != 0 or group.get("maximize", False) or group.get("differentiable", False):
                raise ValueError(
                    f"fast path: optimizer param group {i} uses dampening/maximize/differentiable, which the "
                    "fast SGD update does not implement; use fast.enabled=false"
                )
            if isinstance(group["lr"], Tensor):
                raise ValueError(f"fast path: optimizer param group {i} has a tensor lr; give SGD a float lr")
        self.model, self.objective, self.attack, self.optimizer = model, objective, attack, optimizer
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.requested = capture
        self.mode = capture if self.cuda else "none"
        self.precision = precision
        self.impl = ("fused" if self.cuda else "foreach") if sgd == "auto" else sgd
        self.cache_weights = bool(cache_weights)
        self.compile_model = bool(compile_model)
        # The forwards go through ``net``: the model itself, or a compiled view of it sharing its parameters,
        # buffers and modules (nothing outside the step sees the compiled wrapper).
        self.net: nn.Module = torch.compile(model, dynamic=False) if compile_model else model  # type: ignore[assignment]
        self.streams = streams
        # the clean forward's stream (fast.streams=2), made once: a captured graph refers to it
        self._aux: torch.cuda.Stream | None = None
        if streams == 2 and self.cuda and objective.uses_clean:
            self._aux = torch.cuda.Stream(device=self.device)
        self.warmup_steps = warmup_steps
        self.memory_format = memory_format
        self.sums = torch.zeros(5, device=self.device)
        self.steps = 0
        self.captures = 0
        self.fallback: str | None = None  # why the requested capture was given up, if it was
        self._lr = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device) for g in self._pgroups]
        self._lr_seen = [float(g["lr"]) for g in self._pgroups]
        self._graphs: dict[tuple, _Captured] = {}
        self._pool: Any = None
        self._compiled: Callable[..., None] | None = None
        self._groups: list[_Group] = []
        self._tracked: list[Tensor] = []
        self.refresh()
        if self.cache_weights:  # where _fill_weight_cache files the products: fixed by the modules, found once
            hadamard, plain, _ = self._products
            self._cache_keys = _weight_cache_keys([entry[0] for entry in hadamard + plain])
        self._seen_fingerprint: tuple | None = None
        if capture != "none" and not self.cuda:
            log.info("fast.capture=%s needs CUDA; running the fast step eagerly on %s", capture, self.device)

    # ---- state --------------------------------------------------------------------------
    @property
    def _pgroups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def _collect_groups(self) -> list[_Group]:
        """Params with requires_grad per group, with momentum buffers created (zeros) where missing."""
        groups = []
        for group in self._pgroups:
            params = [p for p in group["params"] if p.requires_grad]
            buffers = []
            if group["momentum"] != 0:
                for p in params:
                    state = self.optimizer.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    elif buf.stride() != p.stride():  # e.g. loaded contiguous for a channels-last factor
                        state["momentum_buffer"] = torch.empty_like(p).copy_(buf)  # fused kernels want one layout
                    buffers.append(state["momentum_buffer"])
            groups.append(
                _Group(params, buffers, float(group["momentum"]), float(group["weight_decay"]), bool(group["nesterov"]))
            )
        return groups

    def refresh(self) -> None:
        """Re-read the tensors the step uses from the model and the optimizer state, so that replaced
        objects (``optimizer.load_state_dict``, a reassigned buffer) are picked up. Walking a
        parametrized model costs ~1 ms, so this runs at each epoch start (:class:`FastFReP`) and when
        the per-step check sees a changed storage, not at every step."""
        self._groups = self._collect_groups()
        self._tracked = [*self.model.parameters(), *self.model.buffers()]
        if self.cache_weights:  # what _fill_weight_cache multiplies (tensors may have been replaced)
            self._products = _products_by_kind(self.model)
        self._tracked += [b for g in self._groups for b in g.buffers]

    def _fingerprint(self) -> tuple:
        """What a captured graph has baked in: storages (``.data`` swaps included) and hyper-parameters."""
        ptrs = tuple(t.data_ptr() for t in self._tracked)
        hyper = tuple((len(g["params"]), g["momentum"], g["weight_decay"], g["nesterov"]) for g in self._pgroups)
        return (ptrs, hyper, self.model.training, repr(self.objective), repr(self.attack))

    def _sync_lr(self) -> None:
        """Copy a changed python LR into its device tensor (a fill, no host sync)."""
        for i, group in enumerate(self._pgroups):
            lr = float(group["lr"])
            if lr != self._lr_seen[i]:
                self._lr[i].fill_(lr)
                self._lr_seen[i] = lr

    # ---- the step -----------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            # no autocast weight cache: cached casts would be graph-private tensors reused across replays
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _weights(self) -> contextlib.AbstractContextManager[Any]:
        return parametrize.cached() if self.cache_weights else contextlib.nullcontext()

    def _fill_weight_cache(self) -> None:
        """Every W = W1*W2*mask (and W*mask) at once, with multi-tensor kernels (two for all Hadamard layers
        instead of two per layer), stored where ``parametrize.cached()`` looks them up. Same values and
        gradients as computing each lazily at its first use; made here, on the step's stream, so that a
        second stream (``streams=2``) forked after this reads finished weights."""
        hadamard, plain, other = self._products
        filled: list[tuple[nn.Module, Tensor]] = []
        if hadamard:
            modules, w1, w2, masks = zip(*hadamard, strict=True)
            products = torch._foreach_mul(torch._foreach_mul(list(w1), list(w2)), list(masks))
            filled += zip(modules, products, strict=True)
        if plain:
            modules, w, masks = zip(*plain, strict=True)
            filled += zip(modules, torch._foreach_mul(list(w), list(masks)), strict=True)
        for key, (_, weight) in zip(self._cache_keys, filled, strict=True):
            parametrize._cache[key] = weight
        if filled and filled[0][0].weight is not filled[0][1]:  # parametrize's private cache layout changed
            raise RuntimeError(
                "fast.cache_weights: torch.nn.utils.parametrize no longer reads its cache the way this torch "
                f"version was expected to ({torch.__version__}); set fast.cache_weights=false"
            )
        for module in other:  # FReP-CH's M @ W2: computed (and cached) here too, per layer
            module.weight  # noqa: B018

    def body(self, x: Tensor, y: Tensor, lrs: Sequence[float | Tensor]) -> None:
        """FReP.training_step + SGD: everything that one captured replay does."""
        model, objective, aux = self.net, self.objective, self._aux
        with self._autocast(), self._weights():
            if self.cache_weights:
                self._fill_weight_cache()
            if aux is None:
                logits_clean = model(x) if objective.uses_clean else None
                reference = None if logits_clean is None else logits_clean.detach()
                x_adv = self.attack.perturb(model, x, lambda out: objective.attack_loss(out, reference, y))
            else:
                main = torch.cuda.current_stream(self.device)
                aux.wait_stream(main)  # fork: x and the weights are ready
                with torch.cuda.stream(aux):
                    logits_clean = model(x)  # updates the BN running statistics; its backward runs on aux too
                reference = logits_clean.detach()

                def attack_loss(out: Tensor) -> Tensor:
                    main.wait_stream(aux)  # the attack's forward ran alongside; now the reference is needed
                    return objective.attack_loss(out, reference, y)

                x_adv = self.attack.perturb(model, x, attack_loss)
            logits_adv = model(x_adv)
            loss = objective(logits_clean, logits_adv, y)
        flat = [p for g in self._groups for p in g.params]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
        if aux is not None:
            # join (capture requires it; autograd already synced the gradients): every aux tensor is then
            # done before the update, and the next step's fork waits for this step's main-stream work
            torch.cuda.current_stream(self.device).wait_stream(aux)
        start = 0
        for group, lr in zip(self._groups, lrs, strict=True):
            gs = grads[start : start + len(group.params)]
            start += len(group.params)
            keep = [i for i, g in enumerate(gs) if g is not None]  # torch.optim.SGD skips grad-less params
            params = [group.params[i] for i in keep]
            # same layout as the parameter (a fused/foreach kernel wants matching strides)
            grads_kept = [
                gs[i] if gs[i].stride() == group.params[i].stride() else torch.empty_like(group.params[i]).copy_(gs[i])
                for i in keep
            ]
            bufs = [group.buffers[i] for i in keep] if group.momentum != 0 else []
            sgd_update_(
                params,
                grads_kept,
                bufs,
                lr=lr,
                momentum=group.momentum,
                weight_decay=group.weight_decay,
                nesterov=group.nesterov,
                impl=self.impl,
            )
        with torch.no_grad():
            n = y.numel()
            loss = loss.detach().float()
            self.sums[SUM_LOSS].add_(loss * n)
            self.sums[SUM_CORRECT_ADV].add_((logits_adv.detach().argmax(dim=1) == y).sum())
            if reference is not None:
                self.sums[SUM_CORRECT_CLEAN].add_((reference.argmax(dim=1) == y).sum())
            self.sums[SUM_COUNT].add_(n)
            self.sums[SUM_NONFINITE].add_(torch.isfinite(loss).logical_not())

    def __call__(self, x: Tensor, y: Tensor) -> None:
        """One training step on the batch ``(x, y)`` (already on the device)."""
        self.steps += 1
        self._sync_lr()
        if self.memory_format is not torch.contiguous_format:
            x = x.contiguous(memory_format=self.memory_format)
        try:
            if self.mode == "cuda_graph":
                self._graph_step(x, y)
            elif self.mode == "compile":
                self._compiled_step(x, y)
            else:
                self.body(x, y, self._lr_seen)
        except torch._dynamo.exc.TorchDynamoException as err:
            if not self.compile_model:
                raise
            # compilation happens in the first (warm-up) steps: the run stops there, its checkpoints untouched
            raise RuntimeError(
                f"fast.compile_model=true: torch.compile could not compile the model ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0][:300]}); set fast.compile_model=false"
            ) from err

    def eager_reference(self, x: Tensor, y: Tensor) -> None:
        """The captured step's arithmetic (LR read from the device tensor), run eagerly: what a replay must
        reproduce (the GPU check of ``experiments/bench.py`` compares the two)."""
        self.steps += 1
        self._sync_lr()
        self.body(x.contiguous(memory_format=self.memory_format), y, self._lr)

    def _give_up(self, what: str, err: BaseException) -> None:
        self.fallback = f"{what} failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})"
        rank_zero_warn(f"fast path: {self.fallback}; running the step eagerly from now on")
        self.mode = "none"
        self._graphs.clear()
        self._compiled = None

    def _graph_step(self, x: Tensor, y: Tensor) -> None:
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        entry = self._graphs.setdefault(key, _Captured())
        fingerprint = self._fingerprint()
        if fingerprint != self._seen_fingerprint:  # first step, or a storage changed: re-read everything
            self.refresh()
            fingerprint = self._seen_fingerprint = self._fingerprint()
        if entry.graph is not None and entry.fingerprint != fingerprint:
            rank_zero_info("fast path: a tensor or hyper-parameter the captured step uses changed; re-capturing")
            entry.graph = None
        if entry.graph is None:
            if entry.warm < self.warmup_steps:
                self._side_stream_step(x, y)
                entry.warm += 1
                return
            try:
                self._capture(entry, x, y)
            except Exception as err:  # a capture failure must not end the run: fall back, loudly
                self._give_up("CUDA graph capture", err)
                self.body(x, y, self._lr_seen)
                return
            entry.fingerprint = fingerprint
        assert entry.x is not None and entry.y is not None
        entry.x.copy_(x)
        entry.y.copy_(y)
        entry.graph.replay()

    def _side_stream_step(self, x: Tensor, y: Tensor) -> None:
        """An eager step on a side stream (how CUDA graph capture wants its warm-up)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.body(x, y, self._lr)
        current.wait_stream(side)

    def _capture(self, entry: _Captured, x: Tensor, y: Tensor) -> None:
        entry.x = torch.empty_like(x, memory_format=self.memory_format).copy_(x)
        entry.y = y.clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.body(entry.x, entry.y, self._lr)
        entry.graph = graph
        self.captures += 1
        rank_zero_info(f"fast path: captured the training step for batch shape {tuple(x.shape)} (step {self.steps})")

    def _compiled_step(self, x: Tensor, y: Tensor) -> None:
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.body, mode="reduce-overhead", dynamic=False)
            self._compiled(x, y, self._lr)
        except Exception as err:
            self._give_up("torch.compile", err)
            self.body(x, y, self._lr_seen)

    # ---- metrics --------------------------------------------------------------------------
    def read_metrics(self) -> dict[str, float]:
        """Means since the last read (one host sync), then reset the sums."""
        out = sum_means(self.sums)
        self.sums.zero_()
        return out

    def describe(self) -> str:
        """What actually ran, for logs and the bench table."""
        parts = [self.mode if self.mode != "none" else "eager", self.precision, f"sgd={self.impl}"]
        if self.captures:
            parts.append(f"captures={self.captures}")
        if self.memory_format is torch.channels_last:
            parts.append("channels_last")
        if self.cache_weights:
            parts.append("cached W")
        if self.compile_model:
            parts.append("compiled model")
        if self._aux is not None:
            parts.append("2 streams")
        if self.fallback:
            parts.append(f"fallback: {self.fallback}")
        return ", ".join(parts)

    def release(self) -> None:
        """Drop captured graphs and their memory pool."""
        self._graphs.clear()
        self._pool = None
        self._compiled = None

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """Copies of the LightningModule (e.g. the ensemble's) get no step: graphs cannot be copied."""
        return None


class FastFReP(FReP):
    """:class:`~frep_lightning.module.FReP` whose training step is captured (see the module docstring).

    Extra args (config ``fast.*``): ``capture``, ``precision``, ``channels_last`` (model and inputs
    in NHWC, the layout bf16 convolutions want), ``sgd``, ``cache_weights``, ``compile_model``,
    ``streams``, ``warmup_steps`` (:class:`FastStep`) and ``cudnn_benchmark`` (let cuDNN pick
    convolution algorithms during warm-up; ignored with a deterministic trainer).
    """

    def __init__(
        self,
        model: nn.Module,
        *args: Any,
        capture: str = "cuda_graph",
        precision: str = "fp32",
        channels_last: bool = False,
        sgd: str = "auto",
        cache_weights: bool = False,
        compile_model: bool = False,
        streams: int = 1,
        warmup_steps: int = 3,
        cudnn_benchmark: bool = True,
        **kwargs: Any,
    ) -> None:
        check_choice("fast.capture", capture, CAPTURES)
        check_choice("fast.precision", precision, PRECISIONS)
        check_choice("fast.sgd", sgd, SGD_IMPLS)
        for key, flag in (
            ("channels_last", channels_last),
            ("cache_weights", cache_weights),
            ("compile_model", compile_model),
            ("cudnn_benchmark", cudnn_benchmark),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"fast.{key} must be true or false, got {flag!r}")
        _check_compile_model(compile_model, capture, cache_weights)
        warmup_steps = check_int("fast.warmup_steps", warmup_steps, 1)  # capture needs a warm-up
        super().__init__(model, *args, **kwargs)
        _check_streams(streams, capture, self.attack)  # needs the attack (its BatchNorm mode)
        self.automatic_optimization = False
        self.fast_options = {
            "capture": capture,
            "precision": precision,
            "sgd": sgd,
            "cache_weights": cache_weights,
            "compile_model": compile_model,
            "streams": streams,
            "warmup_steps": warmup_steps,
        }
        self.channels_last = channels_last
        self.cudnn_benchmark = cudnn_benchmark
        if channels_last:  # before the ensemble's copy is made, so both models share the layout
            self.model.to(memory_format=torch.channels_last)
        self.fast_step: FastStep | None = None
        self.fast_summary: str | None = None  # what ran (FastStep.describe), kept after training
        self._cudnn_benchmark_before: bool | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def on_train_start(self) -> None:
        trainer = self.trainer
        if str(trainer.precision) not in ("32-true", "32"):
            raise ValueError(
                f"fast.enabled=true needs trainer.precision=32-true (got {trainer.precision}); "
                "use fast.precision=bf16 for mixed precision inside the captured step"
            )
        if trainer.world_size > 1:
            raise ValueError(
                "fast.enabled=true runs on one device: its step computes gradients with torch.autograd.grad, "
                "which DDP does not all-reduce; use fast.enabled=false with several devices"
            )
        self._cudnn_benchmark_before = torch.backends.cudnn.benchmark  # restored at train end: not for evaluation
        if self.cudnn_benchmark and self.device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
            torch.backends.cudnn.benchmark = True
        optimizer = self.optimizers(use_pl_optimizer=False)
        if isinstance(optimizer, list):
            raise ValueError("the fast path drives exactly one optimizer")
        self.fast_step = FastStep(
            self.model,
            self.objective,
            self.attack,
            optimizer,
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format,
            **self.fast_options,
        )
        # A checkpoint written before the epoch-end scheduler step: bring the LR to this epoch.
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if config.interval == "epoch" and config.frequency == 1 and hasattr(sched, "last_epoch"):
                while sched.last_epoch < self.current_epoch:
                    sched.step()
        rank_zero_info(f"fast path: {self.fast_step.describe()}")
        self._restore_epoch_sums()  # into the step's own sums, which a captured graph writes in place

    def on_train_epoch_start(self) -> None:
        if self.fast_step is not None:
            self.fast_step.refresh()

    def on_train_end(self) -> None:
        if self.fast_step is not None:
            self.fast_summary = self.fast_step.describe()
            self.fast_step.release()
        self.fast_step = None
        if self._cudnn_benchmark_before is not None:  # the final evaluation runs with the process's own setting
            torch.backends.cudnn.benchmark = self._cudnn_benchmark_before
            self._cudnn_benchmark_before = None

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        step = self.fast_step
        if step is None:
            raise RuntimeError("FastFReP.training_step outside trainer.fit (on_train_start builds the step)")
        optimizer = self.optimizers()
        optimizer.step(closure=lambda: step(x, y))  # Lightning counts the step and runs its hooks
        self._step_schedulers(batch_idx)

    def _step_schedulers(self, batch_idx: int) -> None:
        """Where automatic optimization steps them (Lightning 2.6 ``training_epoch_loop.advance``): after
        the optimizer step, before ``on_train_batch_end``; epoch-wise ones after the epoch's last batch,
        so callbacks (the ensemble's LR watch) see the new LR at that batch, as on the plain path."""
        trainer = self.trainer
        last = batch_idx + 1 >= trainer.num_training_batches or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        for config in trainer.lr_scheduler_configs:
            if config.reduce_on_plateau:
                continue
            due_step = config.interval == "step" and (batch_idx + 1) % config.frequency == 0
            due_epoch = config.interval == "epoch" and last and (self.current_epoch + 1) % config.frequency == 0
            if due_step or due_epoch:
                config.scheduler.step()

    def _sums_if_any(self) -> Tensor | None:
        """The captured step writes its sums in place: the module's epoch means read them there."""
        return self.fast_step.sums if self.fast_step is not None else None

    def training_sums(self) -> Tensor:
        if self.fast_step is None:
            raise RuntimeError("FastFReP.training_sums outside trainer.fit (on_train_start builds the step)")
        return self.fast_step.sums


def iter_fast_options(cfg: Any) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of a ``fast:`` config block that FastFReP takes (``enabled`` excluded)."""
    keys = ("capture", "precision", "channels_last", "sgd", "cache_weights", "compile_model", "streams", "warmup_steps")
    for key in (*keys, "cudnn_benchmark"):
        if key in cfg and cfg[key] is not None:
            yield key, cfg[key]
