"""Fine-tuning step cost: MCN step (MCN loss: softmax + filter + centre) / float step
(cross-entropy), same model, batch and optimiser, measured in one process.
Goal (fine-tuning issue): at most 1.25x.

``--compile`` adds the row of ``runtime.compile``: the same MCN step with the model and the loss
compiled in place (`mcn_compress.training.compile`, ``--mode`` as ``runtime.compile_mode``) on
a copy of the model, against the eager MCN step. After compiling and warming up, the two
steps run in alternating pairs (``--rounds`` x ``--iters`` pairs, who goes first alternates)
and the ratio is the median of the per-pair ratios, so load that comes and goes on a shared
machine hits both alike. The compile time (first steps) is printed separately.

Usage: python benchmarks/finetune_step.py [--arch mcn_resnet_small] [--batch 128] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mcn_compress import MCNConfig, convert, load_float_model
from mcn_compress.training.compile import compile_module
from mcn_compress.training.loss import MCNLoss


def _median(step: Callable[[], None], iters: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _timed(step: Callable[[], None], iters: int) -> float:
    """Median seconds of ``iters`` calls of ``step`` (no warm-up)."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mcn_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, compile_mode: str | None
) -> Callable[[], None]:
    criterion = MCNLoss(model, 10, theta=1e-4, lambda_center=1e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if compile_mode is not None:
        compile_module(model, compile_mode, "model")
        compile_module(criterion, compile_mode, "loss")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).total.backward()
        optimizer.step()

    return step


def _compile_row(
    mcn: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> None:
    eager = _mcn_step(copy.deepcopy(mcn), x, y, None)
    fast = _mcn_step(copy.deepcopy(mcn), x, y, args.mode)
    start = time.perf_counter()
    fast()
    first = time.perf_counter() - start
    for _ in range(3):
        eager()
        fast()
    ratios, t_eager, t_fast = [], [], []
    for i in range(args.rounds * args.iters):
        order = (eager, fast) if i % 2 == 0 else (fast, eager)  # alternate who goes first
        seconds = {step: _timed(step, 1) for step in order}
        t_eager.append(seconds[eager])
        t_fast.append(seconds[fast])
        ratios.append(seconds[fast] / seconds[eager])
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print()
    rounds = f"{len(ratios)} interleaved pairs of steps"
    print(f"runtime.compile (mode {args.mode}): {rounds}")
    print("| eager MCN step (ms) | compiled MCN step (ms) | compiled / eager | first step (s) |")
    print("|---|---|---|---|")
    print(
        f"| {statistics.median(t_eager) * 1e3:.1f} | {statistics.median(t_fast) * 1e3:.1f} | "
        f"{statistics.median(ratios):.3f}x (quartiles {q1:.3f}-{q3:.3f}) | "
        f"{first:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="mcn_resnet_small")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="add the runtime.compile row")
    parser.add_argument("--mode", default="default", help="torch.compile mode (with --compile)")
    parser.add_argument("--rounds", type=int, default=5, help="x --iters step pairs (--compile)")
    args = parser.parse_args()
    torch.manual_seed(0)
    in_chans = 1 if args.arch.startswith("mcn_") else 3
    base = load_float_model(args.arch, pretrained=False, num_classes=10, in_chans=in_chans)
    mcn = convert(base.eval(), MCNConfig(planes=4)).train()
    base.train()
    x = torch.randn(args.batch, in_chans, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    opt_f = torch.optim.AdamW(base.parameters(), lr=1e-4)

    def float_step() -> None:
        opt_f.zero_grad(set_to_none=True)
        F.cross_entropy(base(x), y).backward()
        opt_f.step()

    mcn_step = _mcn_step(copy.deepcopy(mcn), x, y, None)
    t_float = _median(float_step, args.iters)
    t_mcn = _median(mcn_step, args.iters)
    print(
        f"{args.arch}, batch {args.batch}, {args.size}x{args.size}, K=4, "
        f"{torch.get_num_threads()} threads"
    )
    print("| float step (ms) | MCN step with MCN loss (ms) | ratio |")
    print("|---|---|---|")
    print(f"| {t_float * 1e3:.1f} | {t_mcn * 1e3:.1f} | {t_mcn / t_float:.3f}x |")
    if args.compile:
        _compile_row(mcn, x, y, args)


if __name__ == "__main__":
    main()
