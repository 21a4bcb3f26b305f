"""Label-free calibration on Fashion-MNIST: top-1 and wall time of `convert --calibrate-data`.

Trains the float ``mcn_resnet_small`` (3 epochs on 20,000 Fashion-MNIST images, bfloat16 where
the CPU has it, as `quickstart` does) or reuses a finished run in OUT/float, writes 2,048
unlabeled training images as PNG files to OUT/pngs, then runs the whole
``mcn-compress convert ... --calibrate-data OUT/pngs`` command once per variant in its own
process (``--threads`` intra-op threads), timing the command, and measures every result and
the float model in float32 on the 10,000 test images. Prints one markdown table: top-1,
points below float, seconds, threads and the load average before each run
(docs/benchmarks.md "Calibration", docs/design.md section 2.10).

OUT defaults to a new temporary folder (never the repository); pass ``--out`` to keep and
reuse the float model and the images.

Usage:
  python benchmarks/calibration.py                                      # the table
  python benchmarks/calibration.py --out /tmp/cal --variants default,old
  python benchmarks/calibration.py --out /tmp/cal --variants default --repeat 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mcn_compress.defaults import CALIBRATION_IMAGES

#: label -> extra `convert` options (the default calibration first)
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "old": [  # the method before issue 25: batch 128, 300 steps, lr 4e-3, T=4, float32
        "--calibrate-amp=off",
        "--batch-size=128",
        "--calibrate-steps=300",
        "--calibrate-lr=4e-3",
        "--calibrate-temperature=4",
    ],
    "t2": ["--calibrate-temperature=2"],
    "lr4e-3": ["--calibrate-lr=4e-3"],
    "steps700": ["--calibrate-steps=700"],
    "steps1400": ["--calibrate-steps=1400"],
    "batch64": ["--batch-size=64", "--calibrate-steps=600"],
    "bf16": ["--calibrate-amp=bf16"],
    "expand-k2": ["--width=expand", "--planes=2"],
    "bn-only": ["--calibrate-steps=0"],
}


def write_pngs(folder: Path, count: int, seed: int, root: str | None = None) -> Path:
    """``count`` Fashion-MNIST training images (a seeded random subset of the 60,000, labels
    dropped) as grayscale PNG files in ``folder``; an existing complete folder is reused."""
    from PIL import Image

    from mcn_compress.fashion_mnist import load_fashion_mnist

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) == count:
        return folder
    train = load_fashion_mnist(root, train=True)
    pick = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(seed))
    for index in pick[:count].tolist():
        Image.fromarray(train.images[index].numpy(), mode="L").save(folder / f"{index:05d}.png")
    return folder


def float_weights(out: Path, seed: int, root: str | None) -> Path:
    """The float model's state dict in OUT/float (trained once, then reused)."""
    from mcn_compress.experiments.fashion_mnist import Budget, cpu_amp, pretrain_float

    budget = Budget(seed=seed, root=root, amp=cpu_amp())
    checkpoint, _ = pretrain_float(budget, out / "float")
    weights = out / "float-weights.pt"
    if not weights.exists() or weights.stat().st_mtime < checkpoint.stat().st_mtime:
        from mcn_compress.models import read_state_dict

        torch.save(read_state_dict(checkpoint), weights)
    return weights


def top1(model: torch.nn.Module, root: str | None) -> float:
    """float32 top-1 on the 10,000 Fashion-MNIST test images."""
    from mcn_compress.evaluate import evaluate_accuracy
    from mcn_compress.training.recipe import DataRecipe

    recipe = DataRecipe(dataset="fashion_mnist", root=root, batch_size=500, workers=0)
    return evaluate_accuracy(model.float(), recipe)[0]


def convert_command(weights: Path, pngs: Path, out: Path, extra: list[str]) -> list[str]:
    """The `convert` command line of one variant."""
    return [
        "mcn-compress",
        "convert",
        "mcn_resnet_small",
        "--weights",
        str(weights),
        "--num-classes=10",
        "--in-chans=1",
        "--input-size=28",
        "--calibrate-data",
        str(pngs),
        "-o",
        str(out),
        "-q",
        *extra,
    ]


def run_variant(command: list[str], threads: int) -> float:
    """Wall seconds of the whole command, run as ``python -m mcn_compress`` with ``threads``
    intra-op threads (OMP_NUM_THREADS)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mcn_compress", *command[1:]], check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working folder (default: a new temp folder)")
    parser.add_argument("--variants", default="default,old,t2,lr4e-3,steps700,steps1400,expand-k2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=CALIBRATION_IMAGES)
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", help="Fashion-MNIST folder (default: Debian's)")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="mcn-calibration-"))
    torch.set_num_threads(args.threads)
    weights = float_weights(out, args.seed, args.root)
    from mcn_compress.formats.load import load
    from mcn_compress.models import load_float_model

    reference = load_float_model(
        "mcn_resnet_small", weights=weights, num_classes=10, in_chans=1
    ).eval()
    float_top1 = top1(reference, args.root)
    pngs = write_pngs(out / "pngs", args.images, args.seed, args.root)
    print(f"float top-1 {float_top1:.2f}; images in {pngs}; results in {out}", file=sys.stderr)
    print("| variant | options | top-1 | float top-1 | below float | seconds | threads | load |")
    print("|---|---|---|---|---|---|---|---|")
    for label in args.variants.split(","):
        for run in range(args.repeat):
            path = out / f"{label}-{run}.pt"
            command = convert_command(weights, pngs, path, VARIANTS[label])
            load_before = os.getloadavg()[0]
            seconds = run_variant(command, args.threads)
            value = top1(load(path), args.root)
            options = " ".join(VARIANTS[label]) or "(defaults)"
            print(
                f"| {label} | {options} | {value:.2f} | {float_top1:.2f} | "
                f"{float_top1 - value:.2f} | {seconds:.0f} | {args.threads} | {load_before:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
