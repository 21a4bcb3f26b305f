"""Whole-process time of `mcn-compress convert resnet50 --no-pretrained` against the time of
`python -c "import timm; timm.create_model('resnet50')"` on the same machine (goal: <= 2x).

Usage: python benchmarks/convert_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="resnet50")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.pt"
        base = _time(
            [sys.executable, "-c", f"import timm; timm.create_model({args.model!r})"], args.repeats
        )
        conv = _time(
            [
                sys.executable,
                "-m",
                "mcn_compress",
                "convert",
                args.model,
                "--no-pretrained",
                "--quiet",
                "--out",
                str(out),
            ],
            args.repeats,
        )
    print(f"| {args.model} | timm create (s) | convert (s) | ratio |")
    print("|---|---|---|---|")
    print(f"| median of {args.repeats} | {base:.2f} | {conv:.2f} | {conv / base:.2f}x |")


if __name__ == "__main__":
    main()
