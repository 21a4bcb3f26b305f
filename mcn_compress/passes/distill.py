"""Label-free distillation right after conversion (docs/design.md section 2.10).

A keep-mode MCN reconstructs its float filters with a relative error of about 0.9 at K=4,
so right after conversion (even after BatchNorm recalibration) it predicts little better
than chance. `distill_from_float` trains the whole converted model for a thousand or so small
steps to match its float original on unlabeled images: the loss is ``T^2 * KL(softmax(f/T) ||
softmax(m/T))`` between the float logits f and the MCN logits m (Hinton et al. 2015), the
optimiser AdamW without weight decay (decay drags the latent filters to 0 and flips signs),
with a linear warmup and a cosine decay to 0. Both forward passes run under bfloat16 autocast
where the device computes it natively (`amp.autocast_dtype`; parameters, gradients and the
optimiser state stay float32). BatchNorms run in training mode (batch statistics, as in
fine-tuning); afterwards their running statistics are re-estimated in float32 on the same
images (`passes.calibrate`), so the eval-mode model sees statistics of its final weights.
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

from mcn_compress.amp import autocast_dtype
from mcn_compress.defaults import (
    CALIBRATION_IMAGES,
    CALIBRATION_LR,
    CALIBRATION_STEPS,
    CALIBRATION_TEMPERATURE,
)
from mcn_compress.errors import ConfigError
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.calibrate import batch_input, recalibrate_batchnorm

_logger = logging.getLogger(__name__)

DEFAULT_STEPS = CALIBRATION_STEPS
DEFAULT_IMAGES = CALIBRATION_IMAGES
DEFAULT_LR = CALIBRATION_LR
DEFAULT_TEMPERATURE = CALIBRATION_TEMPERATURE
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class DistillResult:
    """What `distill_from_float` did: ``steps`` optimiser steps on ``images`` distinct
    images (``images_seen`` counted with repeats), the batch-averaged KL to the float model of
    the first and of the last step (training-mode batch statistics), the wall time and the
    autocast dtype of the forward passes (``"bfloat16"`` or ``"float32"``)."""

    steps: int
    images: int
    images_seen: int
    kl_start: float
    kl_end: float
    seconds: float
    precision: str = "float32"


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


CACHE_BYTES = 512 * 2**20
"""Most bytes of inputs and float logits `distill_from_float` keeps after its first pass over
the batches; within it, later passes neither read images again nor run the float model."""


def _with_targets(
    batches: Iterable[object],
    teacher: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    cache_bytes: int,
    seed: int = 0,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(pass, inputs, float logits)`` for every batch of ``batches``, again whenever they run
    out (``pass`` counts from 0). The first pass runs ``teacher`` on each batch; when all its
    inputs and logits fit in ``cache_bytes``, later passes reshuffle those (a new seeded order
    per pass, the same batch sizes), else they iterate ``batches`` and run ``teacher`` again.
    """
    kept: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if cache_bytes > 0 else None
    size = count = 0
    for batch in batches:
        x = batch_input(batch).to(device, non_blocking=True)
        target = teacher(x)
        count += 1
        if kept is not None:
            size += x.nbytes + target.nbytes
            if size <= cache_bytes:
                kept.append((x, target))
            else:
                kept = None
        yield 0, x, target
    if count == 0:
        raise ConfigError("no calibration batches were given")
    if kept is None:
        index = 1
        while True:
            for batch in batches:
                x = batch_input(batch).to(device, non_blocking=True)
                yield index, x, teacher(x)
            index += 1
    inputs = torch.cat([x for x, _ in kept])
    targets = torch.cat([t for _, t in kept])
    sizes = [len(x) for x, _ in kept]
    del kept
    generator = torch.Generator().manual_seed(seed)
    index = 1
    while True:
        order = torch.randperm(len(inputs), generator=generator).to(device)
        for chunk in order.split(sizes):
            yield index, inputs[chunk], targets[chunk]
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
    amp: str = "auto",
    cache_bytes: int = CACHE_BYTES,
    bn_images: int | None = None,
) -> DistillResult:
    """Train ``mcn_model`` in place for ``steps`` steps to match ``float_model`` on ``batches``.

    Args:
        mcn_model: the converted model (keep or expand width), on its device.
        float_model: its float original; run in eval mode without gradients, never changed.
        batches: unlabeled input batches (tensors or ``(x, ...)`` pairs), iterated again from
            the start when exhausted unless cached (``cache_bytes``); moved to the device of
            ``mcn_model``.
        steps: optimiser steps (at least 1).
        lr: AdamW learning rate of every parameter (M-Filters: ``lr / 10``).
        temperature: softmax temperature T of the KL.
        progress: called as ``progress(step, kl)`` after each step (1-based).
        batchnorm_train: BatchNorms use batch statistics while distilling (the default;
            False keeps the running statistics fixed).
        recalibrate: re-estimate the BatchNorm statistics on one pass over ``batches``
            afterwards (`passes.calibrate.recalibrate_batchnorm`, in float32).
        amp: ``"auto"`` runs both forward passes under bfloat16 autocast where the device
            computes bfloat16 natively, ``"bf16"`` always, ``"off"`` never
            (`amp.autocast_dtype`). Parameters stay float32 either way.
        cache_bytes: keep the first pass's inputs and float logits when they fit in this
            many bytes, and reshuffle them on later passes (0: read ``batches`` every pass).
        bn_images: at most this many images for the recalibration (None: one whole pass).

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
    dtype = autocast_dtype(device, amp)
    precision = str(dtype or torch.float32).removeprefix("torch.")
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
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

        @torch.no_grad()
        def teacher(x: torch.Tensor) -> torch.Tensor:
            with autocast:
                return float_model(x)

        source = _with_targets(batches, teacher, device, cache_bytes)
        for step in range(steps):
            pass_index, x, target = next(source)
            seen += x.shape[0]
            images += x.shape[0] if pass_index == 0 else 0
            for group, lr0 in zip(optimizer.param_groups, base, strict=True):
                group["lr"] = lr0 * _lr_factor(step, steps)
            with autocast:
                logits = mcn_model(x)
            loss = kl_to_teacher(logits, target, temperature)  # in float32
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
        recalibrate_batchnorm(mcn_model, batches, max_images=bn_images)
    result = DistillResult(
        steps=steps,
        images=images,
        images_seen=seen,
        kl_start=kl_start,
        kl_end=kl_end,
        seconds=time.perf_counter() - start,
        precision=precision,
    )
    _logger.info(
        "distilled %d steps on %d images (%s): KL %.4f -> %.4f in %.1f s",
        steps,
        images,
        precision,
        kl_start,
        kl_end,
        result.seconds,
    )
    return result
