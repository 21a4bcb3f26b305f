"""Fashion-MNIST accuracy table: float baseline vs MCN variants under the same budget.

Trains the float model for --pretrain-epochs, then gives every variant (the float model
included) the same --epochs of fine-tuning from those weights, same seed and data, and prints
one markdown table: top-1/top-5, conv-weight bits, training throughput.

Finished runs (same resolved recipe) are reused, so an interrupted table restarts only the
unfinished variants, and ``--jobs N`` fine-tunes N variants at once in worker processes
(threads split between them) before this process prints the table from their runs.

Usage:
  python benchmarks/fashion_mnist.py --jobs 2 --out runs/bench-fmnist      # README table
  python benchmarks/fashion_mnist.py --arch mcn_resnet_tiny --epochs 2 --train-samples 5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mcn_compress.pipeline import Budget, Variant, pretrain_float, run_comparison

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-fmnist"))
    parser.add_argument("--arch", default="mcn_resnet_small")
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--val-samples", type=int, default=None)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
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
    args = parser.parse_args()
    variants = []
    for key in args.variants.split(","):
        v = VARIANTS[key]
        loss, optim = dict(v.loss), dict(v.optim)
        for item in args.set:
            target, _, value = item.partition("=")
            name, section, field = target.split(".")
            if name == key:
                (loss if section == "loss" else optim)[field] = json.loads(value)
        variants.append(Variant(v.label, v.convert, loss, optim))
    budget = Budget(
        arch=args.arch,
        train_samples=args.train_samples,
        val_samples=args.val_samples,
        pretrain_epochs=args.pretrain_epochs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        augment=args.augment,
    )
    start = time.perf_counter()
    threads = f"{torch.get_num_threads()} threads"
    if args.jobs > 1:
        pretrain_float(budget, args.out / "float")  # once, before the workers share it
        per_worker = run_workers(args.variants.split(","), args.jobs, args.out)
        threads = f"{args.jobs} workers x {per_worker} threads"
    history, results = run_comparison(budget, variants, args.out)  # reuses finished runs
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\nFashion-MNIST, {args.arch}, {args.train_samples or 60000} training images, "
        f"float pretrained {args.pretrain_epochs} epochs (top-1 {history[-1].val_top1:.2f}), "
        f"then {args.epochs} epochs per variant; augmentation {'on' if args.augment else 'off'}; "
        f"seed {args.seed}; "
        f"{threads}; {minutes:.1f} min\n"
    )
    print(
        "| variant | top-1 | top-5 | after conversion | conv-weight bits | vs float | train img/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        after = f"{r.after_conversion_top1:.2f}" if r.after_conversion_top1 is not None else "-"
        ratio = (
            f"1/{r.float_conv_bits / r.conv_bits:.0f}" if r.conv_bits != r.float_conv_bits else "1"
        )
        print(
            f"| {r.label} | {r.top1:.2f} | {r.top5:.2f} | {after} | {r.conv_bits:,} | {ratio} "
            f"| {r.images_per_sec:.0f} |"
        )
    (args.out / "results.json").write_text(
        json.dumps([{**asdict(r), "run_dir": str(r.run_dir)} for r in results], indent=2)
    )


def run_workers(keys: list[str], jobs: int, out: Path) -> int:
    """Fine-tune ``keys`` in ``jobs`` processes of this script (round-robin); returns the
    threads each worker used."""
    threads = max(1, torch.get_num_threads() // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = []
    for i in range(jobs):
        chunk = keys[i::jobs]
        if not chunk:
            continue
        log = out / f"worker-{i}.log"
        argv = [sys.executable, __file__, *sys.argv[1:], "--variants", ",".join(chunk)]
        with log.open("w") as handle:
            proc = subprocess.Popen([*argv, "--jobs", "1"], stdout=handle, stderr=handle, env=env)
        procs.append((proc, log))
    failed = [str(log) for proc, log in procs if proc.wait() != 0]
    if failed:
        sys.exit(f"a worker failed; see {', '.join(failed)}")
    return threads


if __name__ == "__main__":
    main()
