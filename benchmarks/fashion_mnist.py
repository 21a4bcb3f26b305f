"""Fashion-MNIST accuracy table: float baseline vs MCN variants under the same budget.

Trains the float model for --pretrain-epochs, then gives every variant (the float model
included) the same --epochs of fine-tuning from those weights, same seed and data, and prints
one markdown table: top-1/top-5, conv-weight bits, training throughput.

``--seeds 0,1,2`` repeats the whole comparison per seed (own float model, runs in
OUT/seed-N) and prints the mean and sample standard deviation over seeds, each seed's top-1,
and each row's paired difference to MCN keep K=4 (same seed, same float model): the number that
says what a loss term or option adds, with its noise.

Finished runs (same resolved recipe) are reused, so an interrupted table restarts only the
unfinished variants, and ``--jobs N`` fine-tunes N variants at once in worker processes
(threads split between them) before this process prints the table from their runs.

Usage:
  python benchmarks/fashion_mnist.py --jobs 2 --seeds 0,1,2 --out runs/bench-fmnist  # README
  python benchmarks/fashion_mnist.py --arch mcn_resnet_tiny --epochs 2 --train-samples 5000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from mcn_compress.defaults import CALIBRATION_IMAGES, CALIBRATION_STEPS
from mcn_compress.experiments.fashion_mnist import (
    Budget,
    Variant,
    VariantResult,
    finetune_variant,
    pretrain_float,
)
from mcn_compress.training.run_dir import EpochMetrics
from mcn_compress.training.trainer import TrainCallbacks

VARIANTS = {
    "float": Variant("float (same extra epochs)", None),
    "k4": Variant("MCN keep K=4", {"planes": 4}),
    "k2": Variant("MCN keep K=2", {"planes": 2}),
    "mcn1": Variant("MCNs-1 keep K=4", {"planes": 4, "mcn1": True}),
    "bwn": Variant(
        "binary-weight baseline (K=1, scalar M, theta=lambda=0)",
        {"planes": 1, "mcn1": True},
        loss={"theta": 0.0, "lambda_center": 0.0},
    ),
    "exp2": Variant("MCN expand K=2", {"planes": 2, "width": "expand"}),
    "exp4": Variant("MCN expand K=4", {"planes": 4, "width": "expand"}),
    "k4-distill": Variant(
        "MCN keep K=4 + distillation from the float model (0.5, T=4)",
        {"planes": 4},
        loss={"distill": 0.5, "temperature": 4.0},
    ),
    "k4-nofilter": Variant(
        "MCN keep K=4, no filter loss (theta=0)", {"planes": 4}, loss={"theta": 0.0}
    ),
    "k4-nocenter": Variant(
        "MCN keep K=4, no centre loss (lambda=0)", {"planes": 4}, loss={"lambda_center": 0.0}
    ),
}


def run_comparison(
    budget: Budget,
    variants: list[Variant],
    out_dir: Path,
    callbacks_for: Callable[[str], TrainCallbacks | None] = lambda _: None,
) -> tuple[list[EpochMetrics], list[VariantResult]]:
    """Pretrain the float model once, then fine-tune every variant under the same budget."""
    float_weights, history = pretrain_float(budget, out_dir / "float", callbacks_for("float"))
    results = [
        finetune_variant(budget, v, float_weights, out_dir / _slug(v.label), callbacks_for(v.label))
        for v in variants
    ]
    return history, results


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-fmnist"))
    parser.add_argument("--arch", default="mcn_resnet_small")
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--val-samples", type=int, default=None)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds: each trains its own float model and variants in OUT/seed-N; "
        "with two or more the table gives mean +- sd and paired differences to keep K=4",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="random crop + flip while training (off by default: it cost keep K=4 1.6 points)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(k for k in VARIANTS if not k.startswith("exp")),
        help=f"comma-separated keys of: {', '.join(VARIANTS)} (expand is K^2 slower: opt-in)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VARIANT.SECTION.KEY=V",
        help="override, e.g. k4.loss.theta=0.001 or k4.optim.lr=0.003",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="fine-tune this many variants at once in worker processes (threads split evenly)",
    )
    parser.add_argument(
        "--calibrate-images",
        type=int,
        default=CALIBRATION_IMAGES,
        help="unlabeled training images for BatchNorm recalibration and distillation",
    )
    parser.add_argument(
        "--calibrate-steps",
        type=int,
        default=CALIBRATION_STEPS,
        help="label-free distillation steps after conversion (0: BatchNorm only); the "
        "'calibrated' column is the top-1 after them",
    )
    parser.add_argument("--units", help=argparse.SUPPRESS)  # a worker's SEED:VARIANT,... list
    args = parser.parse_args()
    keys = args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {}
    for key in keys:
        v = VARIANTS[key]
        loss, optim = dict(v.loss), dict(v.optim)
        for item in args.set:
            target, _, value = item.partition("=")
            name, section, field = target.split(".")
            if name == key:
                (loss if section == "loss" else optim)[field] = json.loads(value)
        variants[key] = Variant(v.label, v.convert, loss, optim)
    budgets = {
        seed: Budget(
            arch=args.arch,
            train_samples=args.train_samples,
            val_samples=args.val_samples,
            pretrain_epochs=args.pretrain_epochs,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=seed,
            augment=args.augment,
            calibrate_images=args.calibrate_images,
            calibrate_steps=args.calibrate_steps,
        )
        for seed in seeds
    }
    if args.units:  # a worker: fine-tune its share, the parent prints the table
        for unit in args.units.split(","):
            seed, _, key = unit.partition(":")
            run_comparison(budgets[int(seed)], [variants[key]], seed_dir(args.out, int(seed)))
        return
    start = time.perf_counter()
    threads = f"{torch.get_num_threads()} threads"
    if args.jobs > 1:
        for seed in seeds:  # once per seed, before the workers share it
            pretrain_float(budgets[seed], seed_dir(args.out, seed) / "float")
        units = [f"{seed}:{key}" for seed in seeds for key in keys]
        per_worker = run_workers(units, args.jobs, args.out)
        threads = f"{args.jobs} workers x {per_worker} threads"
    runs = {}  # seed -> (float pretraining history, results in variant order)
    for seed in seeds:  # reuses the finished runs
        out = seed_dir(args.out, seed)
        runs[seed] = run_comparison(budgets[seed], list(variants.values()), out)
    minutes = (time.perf_counter() - start) / 60
    pretrained = ", ".join(f"{h[-1].val_top1:.2f}" for h, _ in runs.values())
    print(
        f"\nFashion-MNIST, {args.arch}, {args.train_samples or 60000} training images, "
        f"float pretrained {args.pretrain_epochs} epochs (top-1 {pretrained}), "
        f"then {args.epochs} epochs per variant; augmentation {'on' if args.augment else 'off'}; "
        f"seed{'s' if len(seeds) > 1 else ''} {args.seeds}; {threads}; {minutes:.1f} min\n"
    )
    per_variant = [[results[i] for _, results in runs.values()] for i in range(len(keys))]
    reference = per_variant[keys.index("k4")] if "k4" in keys else None
    print("\n".join(table(per_variant, reference)))
    for seed, (_, results) in runs.items():
        (seed_dir(args.out, seed) / "results.json").write_text(
            json.dumps([{**asdict(r), "run_dir": str(r.run_dir)} for r in results], indent=2)
        )


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def mean_sd(values: list[float]) -> str:
    """``mean`` for one value, ``mean ± sample standard deviation`` for several."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(
    per_variant: list[list[VariantResult]], reference: list[VariantResult] | None
) -> list[str]:
    """Markdown rows: one per variant, its results over seeds (same seed order in every list).

    With several seeds, top-1 is mean ± sd with each seed's value, and ``reference`` (keep K=4)
    gives each row's paired difference: mean ± sd over seeds of (row - reference) top-1.
    """
    several = len(per_variant[0]) > 1
    head = ["variant", "top-1", "top-5", "after conversion", "calibrated"]
    head += ["conv-weight bits", "vs float"]
    if several:
        head[2:2] = ["top-1 per seed"] + (["vs keep K=4 (paired)"] if reference else [])
    lines = ["| " + " | ".join([*head, "train img/s"]) + " |", "|" + "---|" * (len(head) + 1)]
    for results in per_variant:
        first = results[0]
        cells = [first.label, mean_sd([r.top1 for r in results])]
        if several:
            cells.append(" / ".join(f"{r.top1:.2f}" for r in results))
            if reference:
                diffs = [r.top1 - ref.top1 for r, ref in zip(results, reference, strict=True)]
                cells.append("-" if results is reference else signed(diffs))
        afters = [r.after_conversion_top1 for r in results if r.after_conversion_top1 is not None]
        calibrated = [r.calibrated_top1 for r in results if r.calibrated_top1 is not None]
        ratio = first.float_conv_bits / first.conv_bits
        cells += [
            f"{statistics.mean(r.top5 for r in results):.2f}",
            f"{statistics.mean(afters):.2f}" if afters else "-",
            f"{statistics.mean(calibrated):.2f}" if calibrated else "-",
            f"{first.conv_bits:,}",
            f"1/{ratio:.0f}" if first.conv_bits != first.float_conv_bits else "1",
            f"{statistics.mean(r.images_per_sec for r in results):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def signed(diffs: list[float]) -> str:
    """Mean ± sd of paired differences with an explicit sign: ``+0.32 ± 0.20``."""
    text = mean_sd(diffs)
    return text if text.startswith("-") else "+" + text


def run_workers(units: list[str], jobs: int, out: Path) -> int:
    """Fine-tune ``units`` (``SEED:VARIANT``) in ``jobs`` processes of this script
    (round-robin); returns the threads each worker used."""
    threads = max(1, torch.get_num_threads() // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = []
    out.mkdir(parents=True, exist_ok=True)
    for i in range(jobs):
        chunk = units[i::jobs]
        if not chunk:
            continue
        log = out / f"worker-{i}.log"
        argv = [sys.executable, __file__, *sys.argv[1:], "--units", ",".join(chunk)]
        with log.open("w") as handle:
            proc = subprocess.Popen(argv, stdout=handle, stderr=handle, env=env)
        procs.append((proc, log))
    failed = [str(log) for proc, log in procs if proc.wait() != 0]
    if failed:
        sys.exit(f"a worker failed; see {', '.join(failed)}")
    return threads


if __name__ == "__main__":
    main()
