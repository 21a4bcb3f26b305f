"""Label-free distillation right after conversion (docs/design.md section 2.10).

A keep-mode MCN reconstructs its float filters with a relative error of about 0.9 at K=4,
so right after conversion (even after BatchNorm recalibration) it predicts little better
than chance. `distill_from_float` trains the whole converted model for a few hundred steps
to match its float original on unlabeled images: the loss is ``T^2 * KL(softmax(f/T) ||
softmax(m/T))`` between the float logits f and the MCN logits m (Hinton et al. 2015), the
optimiser AdamW without weight decay (decay drags the latent filters to 0 and flips signs),
with a linear warmup and a cosine decay to 0. BatchNorms run in training mode (batch
statistics, as in fine-tuning); afterwards their running statistics are re-estimated on the
same images (`passes.calibrate`), so the eval-mode model sees statistics of its final weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mcn_compress.defaults import (
    CALIBRATION_IMAGES,
    CALIBRATION_STEPS,
)
from mcn_compress.errors import ConfigError
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.calibrate import batch_input, recalibrate_batchnorm

_logger = logging.getLogger(__name__)

DEFAULT_STEPS = CALIBRATION_STEPS
DEFAULT_IMAGES = CALIBRATION_IMAGES
DEFAULT_LR = 4e-3
DEFAULT_TEMPERATURE = 4.0
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class DistillResult:
    """What `distill_from_float` did: ``steps`` optimiser steps on ``images`` distinct
    images (``images_seen`` counted with repeats), the batch-averaged KL to the float model of
    the first and of the last step (training-mode batch statistics), and the wall time."""

    steps: int
    images: int
    images_seen: int
    kl_start: float
    kl_end: float
    seconds: float


def kl_to_teacher(
    logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(logits / T))``, averaged over the batch
    (Hinton et al. 2015; the T^2 keeps gradients comparable across temperatures). Used here
    and by the fine-tuning distillation term (docs/design.md section 3)."""
    kl = F.kl_div(
        F.log_softmax(logits.float() / temperature, dim=1),
        F.log_softmax(teacher_logits.float() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return kl * temperature**2


def _cycle(batches: Iterable[object]) -> Iterator[tuple[int, torch.Tensor]]:
    """``(pass, inputs)`` for every batch of ``batches``, again from the start whenever they
    run out (``pass`` counts from 0)."""
    index = 0
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield index, batch_input(batch)
        if empty:
            raise ConfigError("no calibration batches were given")
        index += 1


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _param_groups(model: nn.Module, lr: float) -> list[dict[str, object]]:
    """M-Filters at a tenth of ``lr`` (they scale whole layers, docs/design.md section 3),
    every other trainable parameter at ``lr``; no weight decay anywhere."""
    mfilters = [m.mfilter for m in model.modules() if isinstance(m, MCConv2d)]
    ids = {id(p) for p in mfilters}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups: list[dict[str, object]] = [{"params": rest, "lr": lr}]
    if mfilters:
        groups.append({"params": mfilters, "lr": lr / 10})
    return groups


def distill_from_float(
    mcn_model: nn.Module,
    float_model: nn.Module,
    batches: Iterable[object],
    steps: int = DEFAULT_STEPS,
    *,
    lr: float = DEFAULT_LR,
    temperature: float = DEFAULT_TEMPERATURE,
    progress: Callable[[int, float], None] | None = None,
    batchnorm_train: bool = True,
    recalibrate: bool = True,
) -> DistillResult:
    """Train ``mcn_model`` in place for ``steps`` steps to match ``float_model`` on ``batches``.

    Args:
        mcn_model: the converted model (keep or expand width), on its device.
        float_model: its float original; run in eval mode without gradients, never changed.
        batches: unlabeled input batches (tensors or ``(x, ...)`` pairs), iterated again from
            the start when exhausted; moved to the device of ``mcn_model``.
        steps: optimiser steps (at least 1).
        lr: AdamW learning rate of every parameter (M-Filters: ``lr / 10``).
        temperature: softmax temperature T of the KL.
        progress: called as ``progress(step, kl)`` after each step (1-based).
        batchnorm_train: BatchNorms use batch statistics while distilling (the default;
            False keeps the running statistics fixed).
        recalibrate: re-estimate the BatchNorm statistics on one pass over ``batches``
            afterwards (`passes.calibrate.recalibrate_batchnorm`).

    Returns:
        A `DistillResult`. The model's train/eval flags and ``requires_grad`` flags are
        restored.
    """
    if steps < 1:
        raise ConfigError(f"distillation steps must be >= 1, got {steps}")
    if not lr > 0 or not temperature > 0:
        raise ConfigError(f"lr and temperature must be > 0, got {lr} and {temperature}")
    param = next(mcn_model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    flags = {m: m.training for m in mcn_model.modules()}
    teacher_flags = {m: m.training for m in float_model.modules()}
    grads = {p: p.requires_grad for p in mcn_model.parameters()}
    teacher_grads = {p: p.requires_grad for p in float_model.parameters()}
    if iter(batches) is batches:  # a one-shot iterator: keep its batches for later passes
        batches = list(batches)
    start = time.perf_counter()
    kl_start = kl_end = float("nan")
    images = seen = 0
    try:
        float_model.eval().requires_grad_(False)
        mcn_model.train()
        for module in mcn_model.modules():
            if isinstance(module, _BatchNorm) and not batchnorm_train:
                module.eval()
        for p in grads:
            p.requires_grad_(p.is_floating_point())
        optimizer = torch.optim.AdamW(_param_groups(mcn_model, lr), lr=lr, weight_decay=0.0)
        base = [group["lr"] for group in optimizer.param_groups]
        source = _cycle(batches)
        for step in range(steps):
            pass_index, x = next(source)
            x = x.to(device, non_blocking=True)
            seen += x.shape[0]
            images += x.shape[0] if pass_index == 0 else 0
            for group, lr0 in zip(optimizer.param_groups, base, strict=True):
                group["lr"] = lr0 * _lr_factor(step, steps)
            with torch.no_grad():
                target = float_model(x)
            loss = kl_to_teacher(mcn_model(x), target, temperature)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"distillation diverged at step {step + 1} (KL {float(loss)}); lower the "
                    "learning rate or the number of steps"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            kl_end = float(loss.detach())
            if step == 0:
                kl_start = kl_end
            if progress is not None:
                progress(step + 1, kl_end)
    finally:
        for module, flag in flags.items():
            module.train(flag)
        for module, flag in teacher_flags.items():
            module.train(flag)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for p, flag in teacher_grads.items():
            p.requires_grad_(flag)
    if recalibrate:
        recalibrate_batchnorm(mcn_model, batches)
    result = DistillResult(
        steps=steps,
        images=images,
        images_seen=seen,
        kl_start=kl_start,
        kl_end=kl_end,
        seconds=time.perf_counter() - start,
    )
    _logger.info(
        "distilled %d steps on %d images: KL %.4f -> %.4f in %.1f s",
        steps,
        images,
        kl_start,
        kl_end,
        result.seconds,
    )
    return result
