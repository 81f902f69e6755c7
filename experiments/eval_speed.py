"""How fast is PGD-50 evaluation, and may it run in bf16? (issue 3: 10k CIFAR-10 images, ResNet-18, < 1 min)

Times ``frep_lightning.evaluate.run_attacks`` with PGD-50 (eps 8/255, step 2/255, random start)
on N test images, once in fp32 and once with bf16 autocast for the attack's forward/backward
(predictions stay fp32), and compares the two per example. bf16 is acceptable only if the
robust accuracies agree within 0.3 pts (printed as ``bf16 ok``).

    # GPU, the real question (random weights unless --ckpt; real CIFAR-10 test images if the pack is found)
    python experiments/eval_speed.py --n 10000 --batch-size 1000
    python experiments/eval_speed.py --n 10000 --ckpt outputs/<run>/<time>   # a trained run: meaningful agreement
    # CPU smoke (what the test runs)
    python experiments/eval_speed.py --n 8 --width 4 --device cpu --batch-size 8

Prints one markdown table row per precision and a final verdict line.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from frep_lightning.evaluate import build_attacks, run_attacks
from frep_lightning.models import build_model

AGREEMENT_PTS = 0.3


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def load_data(n: int, data_root: str | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The class-balanced n-image CIFAR-10 test subset when the pack is there, else uniform noise
    with random labels (timing is the same; accuracy is then meaningless)."""
    from frep_lightning.data import ImageClassificationData

    dm = ImageClassificationData(name="cifar10", root=data_root, n_test=n, eval_batch_size=n, seed=seed)
    try:
        dm.check_available()
    except FileNotFoundError:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "random images"
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    return x, y, "CIFAR-10 test"


def load_network(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    if args.ckpt:
        from omegaconf import OmegaConf

        from frep_lightning.eval import find_run_config, load_model, resolve_ckpt

        path = resolve_ckpt(args.ckpt)
        config = find_run_config(path)
        if config is None:
            sys.exit(f"--ckpt {path}: no config.yaml beside it")
        run_cfg = OmegaConf.load(config)
        return load_model(path, run_cfg, run_cfg.model), str(path)
    return build_model("resnet18", num_classes=10, width=args.width), "random weights"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="test images")
    parser.add_argument("--width", type=int, default=None, help="ResNet-18 base width (default: the paper's 64)")
    parser.add_argument("--ckpt", default=None, help="run dir / model.pt / .ckpt instead of random weights")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument(
        "--tf32", choices=("on", "off"), default="on", help="TF32 convolutions in 'fp32' (PyTorch's default: on)"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.steps < 1:
        parser.error("--n, --batch-size and --steps must be >= 1")

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.benchmark
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    model, source = load_network(args)
    model = model.to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y, data = load_data(args.n, args.data_root, args.seed)
    if not args.ckpt:
        # Only correctly classified images are attacked: with random weights, label every image with
        # the model's own prediction so that all N are attacked (the cost of a trained model's eval
        # at 100 % clean accuracy, an upper bound).
        with torch.no_grad():
            y = torch.cat([model(xb.to(device)).argmax(1).cpu() for xb, _ in _batches(x, y, args.batch_size)])
        data += ", labels = the model's predictions"
    batches = _batches(x, y, args.batch_size)
    name = f"pgd{args.steps}"
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} thr)"
    )
    params = sum(p.numel() for p in model.parameters())

    results = {}
    print(f"# PGD-{args.steps} eval speed: {source}, {data}, {params / 1e6:.2f} M params, batch {args.batch_size}")
    print("| device | precision | N | seconds | images/s | clean | robust |")
    print("|---|---|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        attacks = build_attacks([name], eps="8/255", step_size="2/255", seed=args.seed, precision=precision)
        run_attacks(model, batches[:1], attacks, device=device, seed=args.seed)  # warm-up (kernels, autotune)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = run_attacks(model, batches, attacks, device=device, seed=args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        acc = result.accuracies()
        results[precision] = (seconds, acc, result.correct[name])
        print(
            f"| {device_name} | {precision} | {result.n} | {seconds:.1f} | {result.n / seconds:.0f} | "
            f"{acc['clean'] * 100:.2f} | {acc[name] * 100:.2f} |"
        )
    (t32, a32, c32), (t16, a16, c16) = results["fp32"], results["bf16"]
    diff = abs(a32[name] - a16[name]) * 100
    flips = int((c32 != c16).sum())
    verdict = "bf16 ok" if diff <= AGREEMENT_PTS else "bf16 NOT ok"
    print(
        f"{verdict}: robust accuracy fp32 {a32[name] * 100:.2f} vs bf16 {a16[name] * 100:.2f} "
        f"(|diff| {diff:.2f} pts, limit {AGREEMENT_PTS}; {flips} of {len(c32)} examples differ); "
        f"speed-up x{t32 / t16:.2f}; tf32 convs {torch.backends.cudnn.allow_tf32}"
    )
    return {"fp32_seconds": t32, "bf16_seconds": t16, "diff_pts": diff, "flips": float(flips)}


if __name__ == "__main__":
    main()
