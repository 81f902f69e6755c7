"""The fast path is the plain path, faster: same weights, masks, ensemble and data.

On CPU the fast step runs eagerly (``capture`` falls back off CUDA), so with fixed seeds and
deterministic algorithms a Lightning run of :class:`~frep_lightning.fast.FastFReP` (manual
optimization, our SGD update, device metrics) must reproduce a run of
:class:`~frep_lightning.module.FReP` (automatic optimization, ``torch.optim.SGD``) through a
pruning event, an LR drop and LR-aware ensemble updates. The GPU-resident data path is checked
on CPU tensors against the CPU loader, batch for batch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from frep_lightning.attacks import SignGradientAttack, frozen_bn_stats
from frep_lightning.data.augment import to_float
from frep_lightning.data.datamodule import ImageClassificationData
from frep_lightning.data.device_data import DeviceBatches
from frep_lightning.data.resumable import EpochSeededSampler, ResumableLoader, SeededPairs, collate_seeded
from frep_lightning.ensemble import TemporalEnsemble
from frep_lightning.fast import FastFReP, FastStep, sgd_update_
from frep_lightning.models import build_model
from frep_lightning.module import FReP
from frep_lightning.objectives import SRE
from frep_lightning.pruning import RobustPruning, apply_masks_, compute_masks
from frep_lightning.reparam import factors, iter_masked
from helpers import quiet_trainer


@pytest.fixture
def deterministic() -> Iterator[None]:
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _images(n: int, seed: int = 0, size: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


# ---- the GPU-resident data path, on CPU tensors ------------------------------------------------
def _cpu_loader(images: Tensor, labels: Tensor, batch_size: int, seed: int, replicas: int = 1, rank: int = 0):
    sampler = EpochSeededSampler(
        SeededPairs(images, labels), batch_size, seed, drop_last=True, num_replicas=replicas, rank=rank
    )
    return ResumableLoader(
        sampler.dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=sampler.batch_drop_last,
        collate_fn=functools.partial(collate_seeded, augment=True, flip=True),
    )


# (3, 2): 70 images do not split evenly in 3; the last rank's share is padded (as DistributedSampler does), or
# it would have a batch fewer than the others and DDP would wait forever on its missing step
@pytest.mark.parametrize(("replicas", "rank"), [(1, 0), (2, 1), (3, 2)])
def test_device_batches_are_the_cpu_loaders_batches(replicas: int, rank: int) -> None:
    images, labels = _images(70, size=8)
    device = DeviceBatches(images, labels, 8, seed=3, num_replicas=replicas, rank=rank)
    cpu = _cpu_loader(images, labels, 8, seed=3, replicas=replicas, rank=rank)
    assert len(device) == len(cpu) == math.ceil(70 / replicas) // 8
    for epoch in (0, 1, 5):
        device.set_epoch(epoch)
        cpu.sampler.set_epoch(epoch)
        ours, theirs = list(device), list(cpu)
        assert len(ours) == len(theirs) == len(device)
        for (x1, y1), (x2, y2) in zip(ours, theirs, strict=True):
            assert x1.dtype == torch.float32 and torch.equal(x1, x2) and torch.equal(y1, y2) and len(y1) == 8


def test_device_batches_every_example_once_crops_are_shifted_windows() -> None:
    """Each image carries its index in its pixels: every index once per epoch, and each output is
    its source, zero-padded by 4, cropped at an offset in [0, 8]² and possibly mirrored."""
    n, size = 48, 8
    ids = torch.arange(n, dtype=torch.float32)
    base = torch.stack([torch.full((3, size, size), 1 + i % 200, dtype=torch.uint8) for i in range(n)])
    base[:, 0, 0, :] = torch.arange(size, dtype=torch.uint8) * 20 + 50  # asymmetric row: flips are visible
    labels = ids.long()
    loader = DeviceBatches(base, labels, 12, seed=7)
    padded = nn.functional.pad(to_float(base), (4, 4, 4, 4))
    orders = []
    flips = 0
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen = []
        for x, y in loader:
            assert x.shape == (12, 3, size, size) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
            for img, label in zip(x, y, strict=True):
                src = padded[int(label)]
                windows = [
                    (src[:, r : r + size, c : c + size], f) for r in range(9) for c in range(9) for f in (False, True)
                ]
                matches = [f for w, f in windows if torch.equal(w.flip(-1) if f else w, img)]
                assert matches, f"image of example {int(label)} is no shifted (flipped) window of it"
                flips += all(matches)
            seen.append(y)
        order = torch.cat(seen)
        assert sorted(order.tolist()) == list(range(n))  # every example exactly once
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch
    assert 0 < flips < 2 * n  # some, not all, mirrored
    loader.set_epoch(1)
    again = torch.cat([y for _, y in loader])
    assert torch.equal(again, orders[1])  # deterministic given (seed, epoch)


def test_device_batches_resume_mid_epoch() -> None:
    images, labels = _images(40, size=8)
    full = DeviceBatches(images, labels, 8, seed=1)
    full.set_epoch(2)
    expected = list(full)
    resumed = DeviceBatches(images, labels, 8, seed=1)
    resumed.load_state_dict({"epoch": 2, "batches": 3})
    rest = list(resumed)
    assert len(rest) == 2
    for (x1, y1), (x2, y2) in zip(rest, expected[3:], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    saved = {"epoch": 2, "batches": 1, **full.position_key()}
    for other, key in (
        (DeviceBatches(images, labels, 4, seed=1), "data.batch_size: 8 -> 4"),
        (DeviceBatches(images, labels, 8, seed=1, num_replicas=2, rank=1), "ranks: 1 -> 2"),
    ):
        with pytest.raises(ValueError, match=rf"saved mid-epoch \(epoch 2, after 1 batch\).*{re.escape(key)}"):
            other.load_state_dict(saved)
        other.load_state_dict({**saved, "batches": 0})  # at an epoch start both may change
    with pytest.raises(ValueError, match=r"data\.on_device \(shuffle order\): 'epoch_seeded' -> 'device'"):
        DeviceBatches(images, labels, 8, seed=1).load_state_dict({**saved, "order": "epoch_seeded"})
    done = DeviceBatches(images, labels, 8, seed=1, progress=lambda: 5)
    done.load_state_dict({"epoch": 2, "batches": 5})  # saved after the epoch's last batch
    assert (done.epoch, done.skip_batches) == (3, 0)  # resumes at the start of the next epoch
    first = next(iter(done))
    full.set_epoch(3)
    assert torch.equal(first[1], next(iter(full))[1])


def test_datamodule_on_device_option() -> None:
    with pytest.raises(ValueError, match=r"data\.on_device"):
        ImageClassificationData(on_device="yes")  # type: ignore[arg-type]
    images, labels = _images(40, size=8)
    for on_device, expected in ((True, DeviceBatches), (False, ResumableLoader), (None, ResumableLoader)):
        dm = ImageClassificationData(batch_size=8, on_device=on_device)
        dm._train = (images, labels)  # what setup() would load
        loader = dm.train_dataloader()
        assert isinstance(loader, expected), on_device
    dm = ImageClassificationData(batch_size=8, on_device=True, seed=4)
    dm._train = (images, labels)
    dm_cpu = ImageClassificationData(batch_size=8, on_device=False, seed=4)
    dm_cpu._train = (images, labels)
    for (x1, y1), (x2, y2) in zip(dm.train_dataloader(), dm_cpu.train_dataloader(), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


# ---- the SGD update ----------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_sgd_update_is_torch_sgd(impl: str, nesterov: bool, lr_kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)]
    ours = [p.detach().clone() for p in ref]
    bufs = [torch.zeros_like(p) for p in ours]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=2e-4, nesterov=nesterov)
    for step in range(4):
        lr = 0.1 if step < 2 else 0.01
        for group in opt.param_groups:
            group["lr"] = lr
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for p, grad in zip(ref, grads, strict=True):
            p.grad = grad.clone()
        opt.step()
        sgd_update_(
            ours,
            grads,
            bufs,
            lr=lr if lr_kind == "float" else torch.tensor(lr),
            momentum=0.9,
            weight_decay=2e-4,
            nesterov=nesterov,
            impl=impl,
        )
        for p, q in zip(ref, ours, strict=True):
            torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)
    for p, buf in zip(ref, bufs, strict=True):
        torch.testing.assert_close(buf, opt.state[p]["momentum_buffer"], rtol=1e-6, atol=1e-7)


# ---- FReP vs FastFReP inside Lightning ---------------------------------------------------------
class TinyData(pl.LightningDataModule):
    """64 random images: DeviceBatches (on CPU) for training, a fixed subset for BN re-estimation."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.labels = _images(64, seed=1)
        self.batch_size = 16

    def train_dataloader(self) -> DeviceBatches:
        return DeviceBatches(self.images, self.labels, self.batch_size, seed=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(to_float(self.images[:16]), self.labels[:16]), batch_size=16)

    def train_subset_loader(self, n: int, batch_size: int) -> DataLoader:
        return DataLoader(TensorDataset(to_float(self.images[:n]), self.labels[:n]), batch_size=batch_size)


class Probe(pl.Callback):
    """Records every step (LR, step count, ensemble updates, all live tensors) and the live
    state at the end of training, before the ensemble is copied into the live model."""

    def __init__(self, ensemble: TemporalEnsemble) -> None:
        self.ensemble = ensemble
        self.steps: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(
            {
                "global_step": trainer.global_step,
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "updates": self.ensemble.n_updates,
                "interval": self.ensemble.interval,
                "params": torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone(),
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        self.final = {
            "live": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "ensemble": {k: v.detach().clone() for k, v in self.ensemble._average_model.module.state_dict().items()},
            "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in pl_module.parameters()],
            "lr": optimizer.param_groups[0]["lr"],
            "updates": self.ensemble.n_updates,
            "last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }


# torch.compile on CPU builds C++ kernels: it needs a compiler (CI and dev machines have gcc)
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs a C++ compiler"
)


def _fit(
    tmp_path: Path, fast: dict[str, Any] | None, mode: str = "unstructured"
) -> tuple[Probe, RobustPruning, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = build_model("resnet18", num_classes=10, width=4)
    kwargs: dict[str, Any] = {"lr": 0.1, "milestones": [2], "val_attack_steps": 1, "seed": 0}
    module = FReP(model, **kwargs) if fast is None else FastFReP(model, **kwargs, **fast)
    pruning = RobustPruning(sparsity=0.9 if mode == "unstructured" else 0.5, epoch=1, mode=mode)
    ensemble = TemporalEnsemble(every_n_steps=2, interval_factor=2, bn="recompute", bn_batches=2)
    probe = Probe(ensemble)
    # the probe sees the live model before the ensemble replaces it
    trainer = quiet_trainer(
        tmp_path, [pruning, probe, ensemble], max_epochs=3, num_sanity_val_steps=0, inference_mode=False
    )
    trainer.fit(module, datamodule=TinyData())
    return probe, pruning, trainer


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Probe, RobustPruning, pl.Trainer]:
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _fit(tmp_path_factory.mktemp("plain"), None)
    finally:
        torch.use_deterministic_algorithms(was)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@pytest.mark.parametrize(
    ("fast", "tol"),
    [
        ({"capture": "cuda_graph"}, None),  # off CUDA: the same step, eagerly; float tolerance at every step
        # rounding-level changes (fused kernel, W summed once): sign() of the attack gradient turns a
        # rounding difference into a 2*eps pixel change, so trajectories drift apart slowly and agree in norm
        # (rel. 1e-2 / abs. 1e-4 after 12 steps, 1e-4 after the first: catches gross errors such as stale
        # cached weights; the fused update itself is exact in test_sgd_update_is_torch_sgd)
        ({"capture": "none", "sgd": "fused", "cache_weights": True}, (1e-2, 1e-4, 0.1)),
        # torch.compile'd backbone: inductor's kernels sum in other orders from the first step (gradients agree
        # to ~2e-6, test_compiled_model_matches_eager), enough to flip signs of the near-zero attack gradient at
        # step 1, so trajectories drift a little faster (params rel. ~4e-3 vs ~2e-3 after 12 steps) and the
        # momentum buffers (sums of those gradients) are not compared
        pytest.param({"capture": "none", "compile_model": True}, (3e-2, 1e-3, None), marks=needs_compiler),
    ],
    ids=["default", "fused-cached", "compiled-model"],
)
def test_fast_path_equals_plain_path(
    plain_run: tuple[Probe, RobustPruning, pl.Trainer],
    tmp_path: Path,
    deterministic: None,
    fast: dict[str, Any],
    tol: tuple[float, float, float | None] | None,
) -> None:
    ref, ref_pruning, ref_trainer = plain_run
    probe, pruning, trainer = _fit(tmp_path, fast)
    exact = tol is None
    rel_tol, abs_tol, momentum_tol = tol or (0.0, 0.0, None)
    if not exact:  # before any drift: one step must agree to rounding
        first = _rel(probe.steps[0]["params"], ref.steps[0]["params"])
        assert first < 1e-4, f"parameters after step 1: rel. diff {first:.3g}"

    def close(actual: Tensor, expected: Tensor, what: str) -> None:
        if exact:
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: {m}")
        elif actual.is_floating_point():  # small in norm, or (tiny tensors such as a BN bias) in absolute terms
            diff = float((actual - expected).abs().max())
            assert _rel(actual, expected) < rel_tol or diff < abs_tol, f"{what}: rel. diff {_rel(actual, expected):.3g}"
        else:
            assert torch.equal(actual, expected), what

    # the schedule: same step count, LR at every step (drop at epoch 2), ensemble updates and interval
    assert trainer.global_step == ref_trainer.global_step == 12
    assert [s["global_step"] for s in probe.steps] == [s["global_step"] for s in ref.steps] == list(range(1, 13))
    assert [s["lr"] for s in probe.steps] == [s["lr"] for s in ref.steps]
    assert {round(s["lr"], 6) for s in ref.steps} == {0.1, 0.01}
    assert [(s["updates"], s["interval"]) for s in probe.steps] == [(s["updates"], s["interval"]) for s in ref.steps]
    # updates after steps 2, 4, 6 (f_e = 2), the LR drop seen at step 8 (f_e = 4), updates after 8 and 12
    assert [s["updates"] for s in ref.steps] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]  # read before the step's update
    assert ref.steps[-1]["interval"] == 4 and probe.final["updates"] == ref.final["updates"] == 5
    assert pruning.pruned and pruning.pruned_at_step == ref_pruning.pruned_at_step == 4

    # every step's weights, then the final live model, optimizer state, masks and ensemble
    for i, (ours, theirs) in enumerate(zip(probe.steps, ref.steps, strict=True)):
        close(ours["params"], theirs["params"], f"parameters after step {i + 1}")
    assert probe.final["live"].keys() == ref.final["live"].keys()
    for key, value in ref.final["live"].items():
        if key.endswith(".mask"):
            agree = float((probe.final["live"][key] == value).float().mean())
            assert agree == 1.0 if exact else agree > 0.99, f"{key}: masks agree on {agree:.4f}"
            assert torch.equal(probe.final["ensemble"][key], probe.final["live"][key]), key  # synced masks
        else:
            close(probe.final["live"][key], value, key)
    for key, value in ref.final["ensemble"].items():
        if not key.endswith(".mask"):
            close(probe.final["ensemble"][key], value, f"ensemble {key}")
    for i, (ours_buf, ref_buf) in enumerate(zip(probe.final["momentum"], ref.final["momentum"], strict=True)):
        if exact:
            close(ours_buf, ref_buf, f"momentum buffer {i}")
        elif momentum_tol is not None:  # gradients see the flipped attack signs directly
            assert _rel(ours_buf, ref_buf) < momentum_tol, (
                f"momentum buffer {i}: rel. diff {_rel(ours_buf, ref_buf):.3g}"
            )
    assert probe.final["lr"] == ref.final["lr"] and probe.final["last_epoch"] == ref.final["last_epoch"] == 3

    # pruned weights are exactly zero in the live model (and its factors), at the target sparsity
    masks = {n: (m, p.mask) for n, m, p in iter_masked(trainer.lightning_module)}
    kept = sum(int(mask.sum()) for _, mask in masks.values())
    total = sum(mask.numel() for _, mask in masks.values())
    assert kept == total - round(0.9 * total)

    # epoch metrics: read once per epoch from device sums; the same means as Lightning's
    ours_m, ref_m = probe.final["metrics"], ref.final["metrics"]
    tol = 1e-5 if exact else 0.1
    assert math.isclose(ours_m["train/loss_epoch"], ref_m["train/loss_epoch"], rel_tol=tol)
    assert math.isclose(ours_m["train/acc"], ref_m["train/acc"], rel_tol=tol, abs_tol=0 if exact else 0.1)
    assert math.isclose(ours_m["train/acc_adv"], ref_m["train/acc_adv"], rel_tol=tol, abs_tol=0 if exact else 0.1)
    assert math.isclose(ours_m["val/acc"], ref_m["val/acc"], rel_tol=tol, abs_tol=0 if exact else 0.1)


def test_fast_path_removes_channels_like_the_plain_path(tmp_path: Path, deterministic: None) -> None:
    """Structured pruning: the fast step's own gradient computation (``autograd.grad``) and SGD update
    hold the bias/BN γ/β of pruned channels at zero as the plain path does (the gradient hooks of
    :mod:`frep_lightning.channel_removal`), with the same weights."""
    _, _, ref = _fit(tmp_path / "plain", None, "structured")
    _, pruning, fast = _fit(tmp_path / "fast", {"capture": "cuda_graph"}, "structured")
    assert pruning.pruned and sum(len(v) for v in pruning.dependents.values()) == 20
    live, expected = fast.lightning_module.state_dict(), ref.lightning_module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(live[key], value, rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
    model = fast.lightning_module.model.net
    removed = 0
    for layer, norms in pruning.dependents.items():
        conv = fast.lightning_module.get_submodule(layer)
        dead = conv.weight.detach().flatten(1).abs().amax(1) == 0
        for name in norms:
            bn = fast.lightning_module.get_submodule(name)
            assert not bn.weight[dead].any() and not bn.bias[dead].any(), name
        removed += int(dead.sum())
    assert removed > 0 and model.bn1.bias.abs().sum() > 0  # channels were removed, the kept ones trained


# ---- configuration, validation, failure modes ----------------------------------------------------
def test_fast_config_builds_fast_module_and_device_data() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from frep_lightning.train import build_module, config_dir

    def cfg_for(*overrides: str):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="train", overrides=["model.width=4", *overrides])

    plain = build_module(cfg_for())
    assert type(plain) is FReP and plain.automatic_optimization
    assert instantiate(cfg_for().data).on_device is None  # auto: on with a CUDA trainer
    module = build_module(
        cfg_for("fast.enabled=true", "fast.precision=bf16", "fast.channels_last=true", "fast.sgd=foreach")
    )
    assert isinstance(module, FastFReP) and not module.automatic_optimization
    assert module.fast_options == {
        "capture": "cuda_graph",
        "precision": "bf16",
        "sgd": "foreach",
        "cache_weights": False,
        "compile_model": False,
        "streams": 1,
        "warmup_steps": 3,
    }
    conv = next(p for p in module.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert instantiate(cfg_for("data.on_device=true").data).on_device is True


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"capture": "graph"}, "fast.capture"),
        ({"precision": "fp16"}, "fast.precision"),
        ({"sgd": "adam"}, "fast.sgd"),
        ({"channels_last": "yes"}, "fast.channels_last"),
        ({"warmup_steps": 0}, "fast.warmup_steps"),
        ({"compile_model": 1}, "fast.compile_model"),
        ({"compile_model": True, "capture": "compile"}, "fast.compile_model=true with fast.capture=compile"),
        ({"compile_model": True, "cache_weights": True}, "fast.compile_model=true and fast.cache_weights=true"),
        ({"streams": 3}, "fast.streams"),
        ({"streams": True}, "fast.streams"),
        ({"streams": 2, "capture": "compile"}, "fast.streams=2 with fast.capture=compile"),
        ({"streams": 2, "attack": SignGradientAttack(bn="eval")}, "fast.streams=2 needs method.attack.bn=train"),
    ],
)
def test_fast_options_are_validated(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        FastFReP(build_model("resnet18", width=4), **kwargs)


def _train_cfg(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    from frep_lightning.train import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=["model.width=4", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # off, a typo is still a typo: it used to pass, and fail (after the data check) once switched on
        (["fast.capture=graph"], "fast.capture='graph' is not valid; allowed values: cuda_graph, compile, none"),
        (["fast.warmup_steps=0"], "fast.warmup_steps=0 must be an integer > 0"),
        (["fast.enabled=yes"], "fast.enabled='yes' must be true or false"),  # used to turn the fast path on
        (["fast.enabled=true", "fast.streams=3"], "fast.streams=3 must be 1 or 2"),
        (
            ["fast.enabled=true", "fast.compile_model=true", "fast.cache_weights=true"],
            "fast.compile_model=true and fast.cache_weights=true",
        ),
        (["fast.enabled=true", "fast.streams=2", "method.attack.bn=eval"], "fast.streams=2 needs method.attack.bn"),
        (["fast.enabled=true", "trainer.precision=bf16-mixed"], "trainer.precision='bf16-mixed' with fast.enabled"),
        (["fast.enabled=true", "+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2 with fast"),
        (["fast.enabled=true", "+trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0 with fast.enabled"),
    ],
)
def test_fast_keys_are_validated_with_the_config(overrides: list[str], message: str) -> None:
    """``fast.*`` fails in ``validate_train_config`` (before data loads, and in a sweep's check), not as a bare
    ValueError from FastFReP after setup or as Lightning's manual-optimization error at fit start."""
    from frep_lightning.config import ConfigError, validate_train_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(_train_cfg(*overrides))


def test_valid_fast_configs_pass_validation() -> None:
    from frep_lightning.config import validate_train_config

    validate_train_config(_train_cfg("fast.enabled=true", "fast.precision=bf16", "fast.streams=2", "fast.sgd=fused"))
    validate_train_config(_train_cfg("fast.enabled=true", "fast.warmup_steps=1", "trainer.precision=32"))
    # combinations matter only for a run that uses them
    validate_train_config(_train_cfg("fast.compile_model=true", "fast.cache_weights=true"))


def test_summary_train_step_names_the_fast_path_without_a_step() -> None:
    """A fit resumed from a finished run's checkpoint trains no step (no on_train_start, no fast summary):
    summary.json must not call the fast path "plain"."""
    from frep_lightning.train import train_step_description

    fast = FastFReP(build_model("resnet18", width=4))
    assert train_step_description(fast).startswith("fast path (no training step")
    fast.fast_summary = "eager, fp32, sgd=foreach"
    assert train_step_description(fast) == "eager, fp32, sgd=foreach"
    assert train_step_description(FReP(build_model("resnet18", width=4))) == "plain (automatic optimization)"


def test_fast_step_refuses_what_it_does_not_implement() -> None:
    model = build_model("resnet18", width=4)
    module = FReP(model)
    with pytest.raises(ValueError, match=r"method\.attack\.bn=train"):
        sgd = torch.optim.SGD(module.parameters())
        FastStep(module.model, module.objective, SignGradientAttack(bn="eval"), sgd, streams=2)
    with pytest.raises(TypeError, match="torch.optim.SGD"):
        FastStep(module.model, module.objective, module.attack, torch.optim.Adam(module.parameters()))
    with pytest.raises(ValueError, match="dampening"):
        FastStep(module.model, module.objective, module.attack, torch.optim.SGD(module.parameters(), 0.1, 0.9, 0.5))


def test_fast_step_counts_what_the_plain_step_counts() -> None:
    """The epoch sums of one eager fast step (loss, adversarial and clean correct, count) are the plain
    training step's, on a batch the model classifies correctly clean and mostly wrongly under attack, so
    that a clean accuracy counted from the adversarial output (or the reverse) shows."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    plain = FReP(net, attack=SignGradientAttack(eps=0.5), reparam_kind="none")
    fast = copy.deepcopy(plain)
    plain.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer here
    x = torch.rand(32, 3, 8, 8)
    with torch.no_grad():
        y = plain(x).argmax(dim=1)  # clean accuracy 1 by construction
    torch.manual_seed(1)
    plain.training_step((x, y), 0)
    optimizer = fast.configure_optimizers()["optimizer"]
    step = FastStep(fast.model, fast.objective, fast.attack, optimizer, capture="none", sgd="foreach")
    torch.manual_seed(1)
    step(x, y)
    torch.testing.assert_close(step.sums, plain.training_sums(), rtol=1e-6, atol=0)
    means = step.read_metrics()
    assert means["count"] == 32 and means["acc"] == 1.0 and means["acc_adv"] < 0.5


class _FakeStream:
    """Stands in for torch.cuda.Stream on CPU: records forks/joins and which stream a forward ran on."""

    current = "main"

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: _FakeStream) -> None:
        self.log.append(f"{self.name} waits {other.name}")


class _StreamRecorder(nn.Module):
    def __init__(self, net: nn.Module, log: list[str]) -> None:
        super().__init__()
        self.net, self.log = net, log

    def forward(self, x: Tensor) -> Tensor:
        self.log.append(f"forward on {_FakeStream.current} (grad to input: {x.requires_grad})")
        return self.net(x)


class _LoggedSRE(SRE):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def attack_loss(self, logits_adv: Tensor, logits_clean: Tensor | None, y: Tensor) -> Tensor:
        self.log.append("attack loss")
        return super().attack_loss(logits_adv, logits_clean, y)


@pytest.mark.parametrize("cache", [False, True], ids=["", "cached-weights"])
def test_two_stream_step_orders_its_work_and_computes_the_one_stream_step(
    cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fast.streams=2's control flow, run on CPU with recording stand-ins for the CUDA stream calls: the clean
    forward runs on the second stream after a fork, the attack's forward alongside it on the main stream, the
    attack loss only after the main stream waited for the clean forward, and the step ends joined; the
    weights after two steps are those of the one-stream step, bit for bit."""
    log: list[str] = []

    @contextlib.contextmanager
    def on_stream(stream: _FakeStream) -> Iterator[None]:
        before, _FakeStream.current = _FakeStream.current, stream.name
        try:
            yield
        finally:
            _FakeStream.current = before

    main = _FakeStream("main", log)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    results = []
    for streams in (1, 2):
        torch.manual_seed(0)
        module = FReP(_StreamRecorder(build_model("resnet18", width=4), log), objective=_LoggedSRE(log))
        optimizer = module.configure_optimizers()["optimizer"]
        kw: dict[str, Any] = {"capture": "none", "sgd": "foreach", "cache_weights": cache}
        step = FastStep(module.model, module.objective, module.attack, optimizer, **kw)
        if streams == 2:
            step._aux = _FakeStream("aux", log)  # what __init__ makes on CUDA
        if cache:
            fill = step._fill_weight_cache
            step._fill_weight_cache = lambda fill=fill: (log.append("weights made"), fill())[1]  # type: ignore[method-assign]
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
        log.clear()
        torch.manual_seed(1)
        step(x, y)
        first = list(log)
        step(x.flip(3), y)
        results.append(([p.detach().clone() for p in module.model.parameters()], first))
    (one, one_log), (two, two_log) = results
    if cache:  # made once, first, on the main stream: the second stream forks after they are there
        assert one_log[0] == two_log[0] == "weights made"
        one_log, two_log = one_log[1:], two_log[1:]
    assert one_log == [
        "forward on main (grad to input: False)",
        "forward on main (grad to input: True)",
        "attack loss",
        "forward on main (grad to input: False)",
    ]
    assert two_log == [
        "aux waits main",  # fork
        "forward on aux (grad to input: False)",  # clean
        "forward on main (grad to input: True)",  # attack, alongside
        "main waits aux",  # the reference is needed now
        "attack loss",
        "forward on main (grad to input: False)",  # adversarial
        "main waits aux",  # join before the update
    ]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_stream_captured_step_equals_one_stream_eager_step() -> None:
    """fast.streams=2 moves the clean forward (and its backward) to a second stream; it must not change a
    single number: replays of the two-stream graph, through a pruning event, give the weights, BN statistics
    and loss sums of the one-stream eager step (cuDNN deterministic; same CUDA RNG stream)."""
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        torch.manual_seed(0)
        ref = FReP(build_model("resnet18", width=8)).cuda()
        two = copy.deepcopy(ref)
        g = torch.Generator().manual_seed(1)
        batches = [(torch.rand(32, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (32,), generator=g).cuda())]
        batches.append((batches[0][0].flip(3), batches[0][1]))
        steps = []
        for module, capture, streams in ((ref, "none", 1), (two, "cuda_graph", 2)):
            opt = module.configure_optimizers()["optimizer"]
            kw: dict[str, Any] = {"capture": capture, "streams": streams, "sgd": "foreach"}
            step = FastStep(module.model, module.objective, module.attack, opt, **kw)
            torch.manual_seed(123)
            for i in range(8):
                if i == 4:
                    apply_masks_(module.model, compute_masks(module.model, 0.9), [opt])
                (step.eager_reference if capture == "none" else step)(*batches[i % 2])
            torch.cuda.synchronize()
            steps.append(step)
        assert "2 streams" in steps[1].describe() and steps[1].captures == 1 and steps[1].fallback is None
        for (name, a), (_, b) in zip(two.model.state_dict().items(), ref.model.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
        assert torch.equal(steps[1].sums, steps[0].sums)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@pytest.mark.parametrize("kind", ["hadamard", "none", "channel"])
def test_weight_cache_holds_every_masked_product_with_its_gradient(kind: str) -> None:
    """fast.cache_weights: one multi-tensor fill puts W1*W2*mask (W*mask for plain layers; M@W2 per layer for
    FReP-CH) where every forward reads it, and gradients reach the factors as through the layers' own
    parametrizations (dL/dW1 = g*W2*mask)."""
    torch.manual_seed(0)
    module = FReP(build_model("resnet18", width=4), reparam_kind=kind)
    layers = list(iter_masked(module.model))
    with torch.no_grad():
        for _, _, p in layers[::3]:
            p.mask.bernoulli_(0.5)  # a pruned state
    optimizer = module.configure_optimizers()["optimizer"]
    step = FastStep(module.model, module.objective, module.attack, optimizer, cache_weights=True)
    expected = {name: layer.weight.detach().clone() for name, layer, _ in layers}
    probes = {name: torch.randn_like(w) for name, w in expected.items()}
    with parametrize.cached():
        step._fill_weight_cache()
        weights = {name: layer.weight for name, layer, _ in layers}
        assert all(layer.weight is weights[name] for name, layer, _ in layers)  # read from the cache
        loss = sum((weights[name] * probes[name]).sum() for name in weights)
    for name, w in weights.items():
        assert torch.equal(w, expected[name]), name  # bit for bit: same products, same order
    params = [f for _, layer, _ in layers for f in factors(layer)]
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params), strict=True))
    for name, layer, p in layers:
        fs = factors(layer)
        if kind == "hadamard":
            torch.testing.assert_close(grads[id(fs[0])], probes[name] * fs[1] * p.mask)
            torch.testing.assert_close(grads[id(fs[1])], probes[name] * fs[0] * p.mask)
        elif kind == "none":
            torch.testing.assert_close(grads[id(fs[0])], probes[name] * p.mask)
        else:  # W = (M @ W2) * mask
            g = (probes[name] * p.mask).flatten(1)
            torch.testing.assert_close(grads[id(fs[0])], g @ fs[1].flatten(1).T)


def test_weight_cache_of_a_deep_copy_reads_the_copy() -> None:
    """torch files a deep copy's cached weights under the original's module ids (shared injected class):
    the fill must use the keys the copy's properties look up, so the copy reads its own products; a model
    holding two deep copies of one parametrized layer cannot be cached and is refused."""
    torch.manual_seed(0)
    original = FReP(build_model("resnet18", width=4))
    clone = copy.deepcopy(original)
    with torch.no_grad():
        for p in clone.model.parameters():
            p.mul_(-2.0)  # the copy's weights differ from the original's
    optimizer = clone.configure_optimizers()["optimizer"]
    step = FastStep(clone.model, clone.objective, clone.attack, optimizer, cache_weights=True)
    expected = {name: layer.weight.detach().clone() for name, layer, _ in iter_masked(clone.model)}
    with torch.no_grad(), parametrize.cached():
        step._fill_weight_cache()
        for name, layer, _ in iter_masked(clone.model):
            assert torch.equal(layer.weight, expected[name]), name
        x = torch.rand(2, 3, 32, 32)
        cached_out = clone.model.eval()(x)
    with torch.no_grad():
        assert torch.equal(cached_out, clone.model(x))  # the forward read the copy's own weights

    layer = FReP(nn.Sequential(nn.Flatten(), nn.Linear(12, 4))).model[1]
    twins = nn.Sequential(nn.Flatten(), layer, copy.deepcopy(layer))
    with pytest.raises(ValueError, match="shares its parametrization cache entry"):
        FastStep(twins, SRE(), SignGradientAttack(), torch.optim.SGD(twins.parameters(), lr=0.1), cache_weights=True)


class _NaNObjective(SRE):
    def __call__(self, logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor) -> Tensor:
        return super().__call__(logits_clean, logits_adv, y) * float("nan")


def test_non_finite_loss_fails_at_the_end_of_the_epoch(tmp_path: Path) -> None:
    """No host sync inside a step: a NaN loss is counted on the device and raised once per epoch."""
    module = FastFReP(build_model("resnet18", width=4), objective=_NaNObjective(), val_attack_steps=0)
    data = TinyData()
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0, inference_mode=False)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss in 4 step\(s\) of epoch 0"):
        trainer.fit(module, datamodule=data)


def test_cudnn_benchmark_of_training_does_not_outlive_it(tmp_path: Path) -> None:
    """fast.cudnn_benchmark turns cuDNN's autotuner on for training (on CUDA); the final evaluation in the same
    process runs with the process's own setting again (here the flag is flipped by hand: no CUDA on CI)."""

    class Autotune(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            torch.backends.cudnn.benchmark = True  # what on_train_start does on a CUDA device

    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        module = FastFReP(build_model("resnet18", width=4), val_attack_steps=0)
        trainer = quiet_trainer(tmp_path, [Autotune()], max_epochs=1, limit_val_batches=0, inference_mode=False)
        trainer.fit(module, datamodule=TinyData())
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = was


def test_bf16_channels_last_step_runs_eagerly_and_keeps_layouts() -> None:
    module = FReP(build_model("resnet18", width=4))
    module.model.to(memory_format=torch.channels_last)
    optimizer = module.configure_optimizers()["optimizer"]
    convs = [p for p in module.model.parameters() if p.dim() == 4]
    # a momentum buffer as a checkpoint restores it: contiguous, for a channels-last factor
    optimizer.state[convs[0]]["momentum_buffer"] = convs[0].detach().contiguous().mul(0)
    step = FastStep(
        module.model,
        module.objective,
        module.attack,
        optimizer,
        precision="bf16",
        sgd="fused",
        memory_format=torch.channels_last,
    )
    assert optimizer.state[convs[0]]["momentum_buffer"].stride() == convs[0].stride()  # re-laid out
    before = [p.detach().clone() for p in convs]
    x, y = next(iter(TinyData().train_dataloader()))
    step(x, y)
    step(x, y)
    metrics = step.read_metrics()
    assert metrics["count"] == 2 * len(y) and metrics["nonfinite"] == 0 and math.isfinite(metrics["loss"])
    assert step.read_metrics()["count"] == 0  # reading resets the sums
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(not torch.equal(p, q) for p, q in zip(convs, before, strict=True))
    assert step.describe() == "eager, bf16, sgd=fused, channels_last"


@needs_compiler
def test_compiled_model_matches_eager() -> None:
    """fast.compile_model: FastStep's compiled view of a reparameterized model gives the eager outputs, input
    and factor gradients, and BatchNorm running statistics, in training mode and with the attack's frozen
    statistics (track_running_stats off: a recompiled variant), to float rounding; and it shares the model's tensors."""
    torch.manual_seed(0)
    module = FReP(build_model("resnet18", width=4))
    reference = copy.deepcopy(module.model)
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.1, momentum=0.9)
    step = FastStep(module.model, module.objective, module.attack, optimizer, capture="none", compile_model=True)
    assert step.net is not module.model and "compiled model" in step.describe()
    assert {id(p) for p in step.net.parameters()} == {id(p) for p in module.model.parameters()}
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def run(net: nn.Module, frozen: bool) -> list[Tensor]:
        xa = x.clone().requires_grad_(True)
        with frozen_bn_stats(net) if frozen else contextlib.nullcontext():
            out = net(xa)
            loss = module.objective(out, out.roll(1, 0), y)
        grads = torch.autograd.grad(loss, [xa, *net.parameters()])
        return [out.detach(), *grads]

    for frozen in (False, True, False):  # back to the first variant: no stale compiled state
        ours, theirs = run(step.net, frozen), run(reference, frozen)
        for name, a, b in zip(["logits", "input grad"] + [n for n, _ in reference.named_parameters()], ours, theirs):
            assert _rel(a, b) < 1e-4, f"{name} (frozen BN stats: {frozen}): rel. diff {_rel(a, b):.3g}"
        for (name, a), (_, b) in zip(module.model.named_buffers(), reference.named_buffers(), strict=True):
            if a.is_floating_point():
                assert _rel(a, b) < 1e-5, f"{name}: rel. diff {_rel(a, b):.3g}"
            else:
                assert torch.equal(a, b), name
