"""Sparsity and storage size of an exported model: what 90-99 % sparsity buys on disk.

Counts are exact (``w == 0``), taken from the state_dict that is evaluated, so the report
describes the file, not a mask somewhere else. Sizes are computed, not measured from a
serialised file, for three layouts of each prunable weight:

- ``dense``: every entry at the tensor's dtype;
- ``csr``: the weight viewed as (out_channels, fan_in), values + column indices + row pointers
  (int32 indices while they fit, else int64), the usual sparse-matrix format;
- ``bitmask``: one bit per entry saying "non-zero" + the non-zero values, which beats CSR once
  more than about 1/32 of the entries survive.

``model_sparse_bytes`` stores each prunable layer in the smaller of csr/bitmask and every other
tensor (BatchNorm, biases, normalisation buffers) dense. ``live_channels`` counts output
channels with any non-zero weight: for structured (filter) pruning it is the width that a
physically slimmed network would keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1


def is_prunable_weight(key: str, value: Tensor) -> bool:
    """Conv2d / Linear weights: the tensors FReP prunes (``<layer>.weight`` of rank 2 or 4)."""
    return key.endswith(".weight") and value.dim() in (2, 4)


def _index_bytes(numel: int) -> int:
    return 4 if numel <= INT32_MAX else 8


def layer_report(weight: Tensor) -> dict[str, Any]:
    """Zeros, live output channels and the three storage sizes of one weight tensor."""
    w = weight.detach()
    numel = w.numel()
    rows = w.shape[0] if w.dim() else 1
    nonzero = int(torch.count_nonzero(w))
    itemsize = w.element_size()
    idx = _index_bytes(numel)
    live = int((w.reshape(rows, -1) != 0).any(dim=1).sum()) if numel else 0
    return {
        "shape": list(w.shape),
        "numel": numel,
        "zeros": numel - nonzero,
        "nonzero": nonzero,
        "sparsity": (numel - nonzero) / numel if numel else 0.0,
        "live_channels": live,
        "channels": rows,
        "dense_bytes": numel * itemsize,
        "csr_bytes": nonzero * (itemsize + idx) + (rows + 1) * idx,
        "bitmask_bytes": math.ceil(numel / 8) + nonzero * itemsize,
    }


def compression_report(state: Mapping[str, Tensor], prunable: Iterable[str] | None = None) -> dict[str, Any]:
    """Per-layer table and global totals for a plain state_dict.

    Args:
        state: the model's state_dict (``model.pt``).
        prunable: layer names (without ``.weight``) that pruning selected; ``None`` means every
            Conv2d/Linear weight. ``sparsity`` is over these layers (the number ``summary.json``
            reports); ``layers`` lists every Conv2d/Linear weight with its ``prunable`` flag.

    Returns ``{"sparsity", "zeros", "numel", "nonzero", "layers": {name: {...}}, "sizes": {...}}``.
    """
    weights = {k[: -len(".weight")]: v for k, v in state.items() if is_prunable_weight(k, v)}
    selected = set(weights) if prunable is None else set(prunable)
    unknown = sorted(selected - set(weights))
    if unknown:
        raise KeyError(f"compression_report: prunable layers not in the state_dict: {', '.join(unknown[:5])}")
    if not selected:
        raise ValueError("compression_report: no Conv2d/Linear weight to report on")
    layers: dict[str, dict[str, Any]] = {}
    zeros = numel = 0
    prunable_dense = prunable_sparse = csr_total = bitmask_total = 0
    for name, w in weights.items():
        row = layer_report(w) | {"prunable": name in selected}
        layers[name] = row
        if row["prunable"]:
            zeros += row["zeros"]
            numel += row["numel"]
            prunable_dense += row["dense_bytes"]
            csr_total += row["csr_bytes"]
            bitmask_total += row["bitmask_bytes"]
            prunable_sparse += min(row["csr_bytes"], row["bitmask_bytes"])
    selected_keys = {f"{n}.weight" for n in selected}
    other = [v for k, v in state.items() if k not in selected_keys and torch.is_tensor(v)]
    other_bytes = sum(v.numel() * v.element_size() for v in other)
    other_numel = sum(v.numel() for k, v in state.items() if k not in selected_keys and v.is_floating_point())
    model_dense = prunable_dense + other_bytes
    model_sparse = prunable_sparse + other_bytes
    sizes = {
        "prunable_params": numel,
        "prunable_nonzero": numel - zeros,
        "other_numel": other_numel,
        "prunable_dense_bytes": prunable_dense,
        "prunable_csr_bytes": csr_total,
        "prunable_bitmask_bytes": bitmask_total,
        "other_bytes": other_bytes,
        "model_dense_bytes": model_dense,
        "model_sparse_bytes": model_sparse,
        "compression_ratio": model_dense / model_sparse if model_sparse else float("inf"),
        "live_channels": sum(r["live_channels"] for r in layers.values() if r["prunable"]),
        "channels": sum(r["channels"] for r in layers.values() if r["prunable"]),
    }
    return {
        "sparsity": zeros / numel if numel else 0.0,
        "zeros": zeros,
        "numel": numel,
        "nonzero": numel - zeros,
        "layers": layers,
        "sizes": sizes,
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
