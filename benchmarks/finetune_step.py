"""Fine-tuning step cost: MCN step (MCN loss: softmax + filter + centre) / float step
(cross-entropy), same model, batch and optimiser, measured in one process.
Goal (fine-tuning issue): at most 1.25x.

Usage: python benchmarks/finetune_step.py [--arch mcn_resnet_small] [--batch 128]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mcn_compress import MCNConfig, convert, load_float_model
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="mcn_resnet_small")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--iters", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    in_chans = 1 if args.arch.startswith("mcn_") else 3
    base = load_float_model(args.arch, pretrained=False, num_classes=10, in_chans=in_chans)
    mcn = convert(base.eval(), MCNConfig(planes=4)).train()
    base.train()
    x = torch.randn(args.batch, in_chans, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    opt_f = torch.optim.AdamW(base.parameters(), lr=1e-4)
    opt_m = torch.optim.AdamW(mcn.parameters(), lr=1e-4)
    criterion = MCNLoss(mcn, 10, theta=1e-4, lambda_center=1e-3)

    def float_step() -> None:
        opt_f.zero_grad(set_to_none=True)
        F.cross_entropy(base(x), y).backward()
        opt_f.step()

    def mcn_step() -> None:
        opt_m.zero_grad(set_to_none=True)
        criterion(mcn(x), y).total.backward()
        opt_m.step()

    t_float = _median(float_step, args.iters)
    t_mcn = _median(mcn_step, args.iters)
    print(
        f"{args.arch}, batch {args.batch}, {args.size}x{args.size}, K=4, "
        f"{torch.get_num_threads()} threads"
    )
    print("| float step (ms) | MCN step with MCN loss (ms) | ratio |")
    print("|---|---|---|")
    print(f"| {t_float * 1e3:.1f} | {t_mcn * 1e3:.1f} | {t_mcn / t_float:.3f}x |")


if __name__ == "__main__":
    main()
