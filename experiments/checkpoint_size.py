"""How big is a training checkpoint of the paper recipe, and how long does writing it take?

Builds the ``experiment=paper_resnet18_c10`` module (CIFAR ResNet-18, FReP factors and masks), prunes it
to ``--sparsity``, and writes a checkpoint-shaped dict (live model, ensemble copy, SGD momentum of every
parameter) three ways: ``torch.save`` + fsync of it as it is (float masks), the same after
``compact_masks`` (bool masks, written once; the compaction's time included), and through
``AtomicCheckpointIO`` (compaction, the finiteness guard, temp file, fsync, rename: what training does).
Prints sizes and write times.

    python experiments/checkpoint_size.py --dir /tmp/ck
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from frep_lightning.checkpointing import AtomicCheckpointIO, compact_masks
from frep_lightning.config import config_dir
from frep_lightning.pruning import apply_masks_, compute_masks
from frep_lightning.train import build_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="where to write (the disk being measured)")
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=paper_resnet18_c10"])
    module = build_module(cfg)
    apply_masks_(module, compute_masks(module, args.sparsity))
    live = module.state_dict()
    checkpoint = {
        "state_dict": {k: v.clone() for k, v in live.items()},  # the ensemble: its own buffers
        "current_model_state": live,
        "optimizer_states": [{"state": {i: {"momentum_buffer": torch.randn_like(p)}
                                        for i, p in enumerate(module.parameters())}}],
    }  # fmt: skip
    args.dir.mkdir(parents=True, exist_ok=True)

    def plain(state: dict, path: Path) -> None:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    ways = {
        "torch.save, float masks": plain,
        "torch.save, compact_masks": lambda state, path: plain(compact_masks(state), path),
        "AtomicCheckpointIO": AtomicCheckpointIO().save_checkpoint,
    }
    for name, write in ways.items():
        path = args.dir / "size.ckpt"
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            write(checkpoint, path)
            times.append(time.perf_counter() - t0)
        print(f"{name}: {path.stat().st_size / 1e6:.1f} MB, write {min(times):.2f} s (best of {args.repeats})")
        path.unlink()


if __name__ == "__main__":
    main()
