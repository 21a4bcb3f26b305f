"""MCN vs float speed of one model in one process: eval-mode forward and a training step
(forward + backward + SGD step). Goals for resnet18: eval <= 1.1x, train step <= 1.25x.

Usage: python benchmarks/layer_speed.py [--model resnet18] [--batch 8] [--size 224]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

from mcn_compress import MCNConfig, convert


def _median_time(fn: Callable[[], None], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _eval_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--planes", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False)
    mcn = convert(base.eval(), MCNConfig(planes=args.planes))
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    rows = []
    for label, make in (
        ("eval forward", lambda m: _eval_step(m, x)),
        ("train step", lambda m: _train_step(m, x, y)),
    ):
        # interleave float and MCN measurements so machine noise hits both alike
        t_float = _median_time(make(base), 2, args.iters)
        t_mcn = _median_time(make(mcn), 2, args.iters)
        rows.append((label, t_float, t_mcn))
    print(
        f"{args.model}, batch {args.batch}, {args.size}x{args.size}, K={args.planes}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| step | float (ms) | MCN (ms) | MCN / float |")
    print("|---|---|---|---|")
    for label, t_float, t_mcn in rows:
        print(f"| {label} | {t_float * 1e3:.1f} | {t_mcn * 1e3:.1f} | {t_mcn / t_float:.3f}x |")


if __name__ == "__main__":
    main()
