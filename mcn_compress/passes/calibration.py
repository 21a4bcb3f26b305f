"""`calibrate()`: make a converted model usable before any labelled training (docs/design.md
section 2.10), on unlabeled images only.

Two steps on the same batches: BatchNorm recalibration (`passes.calibrate`, no weight changes),
then ``steps`` of label-free distillation from the float original (`passes.distill`). The model
changes in place; what was done is returned and recorded in its `ConversionSummary`
(``info_of(model).summary``), which checkpoints store and ``report`` shows, with the KL to the
float model in eval mode before and after the distillation (`kl_on_probe`, both on the
same `probe_batches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from mcn_compress.amp import autocast_dtype
from mcn_compress.defaults import CALIBRATION_LR, CALIBRATION_TEMPERATURE, PROBE_IMAGES
from mcn_compress.errors import ConfigError
from mcn_compress.info import info_of, update_info
from mcn_compress.module_utils import kept_train_flags
from mcn_compress.passes.calibrate import batch_input, recalibrate_batchnorm
from mcn_compress.passes.distill import distill_from_float, kl_to_teacher


@dataclasses.dataclass(frozen=True)
class CalibrationStep:
    """A progress event: ``stage`` ``"batchnorm"`` (``done`` images so far) or ``"distill"``
    (``done`` of ``total`` steps, with the KL of that step)."""

    stage: str
    done: int
    total: int | None = None
    kl: float | None = None


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What `calibrate` did: ``images`` distinct images, ``steps`` distillation steps,
    ``kl``, the KL to the float model (`kl_on_probe`) right after the BatchNorm recalibration and
    at the end, and the autocast dtype of the distillation (``"bfloat16"``/``"float32"``;
    None without steps)."""

    images: int
    steps: int
    kl: tuple[float, float] | None = None
    precision: str | None = None


Probe = list[tuple[torch.Tensor, torch.Tensor]]
"""The images of a KL probe and the float model's logits on them, batch by batch."""


@torch.no_grad()
def probe_batches(
    float_model: nn.Module, batches: Iterable[object], images: int = PROBE_IMAGES
) -> Probe:
    """The first ``images`` images of ``batches`` and ``float_model``'s eval-mode logits on
    them, read once so that the probes before and after the distillation compare the same
    images without running the float model again (its train/eval flags are restored)."""
    param = next(float_model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    probe: Probe = []
    seen = 0
    with kept_train_flags(float_model):
        float_model.eval()
        for batch in batches:
            x = batch_input(batch)[: images - seen].to(device)
            probe.append((x, float_model(x)))
            seen += x.shape[0]
            if seen >= images:
                break
    return probe


@torch.no_grad()
def kl_on_probe(model: nn.Module, probe: Probe) -> float:
    """``KL(softmax(float) || softmax(mcn))`` in eval mode (temperature 1, mean over the
    probe's images); ``model``'s train/eval flags are restored."""
    total, seen = 0.0, 0
    with kept_train_flags(model):
        model.eval()
        for x, float_logits in probe:
            total += float(kl_to_teacher(model(x), float_logits, temperature=1.0)) * x.shape[0]
            seen += x.shape[0]
    return total / max(seen, 1)


def calibrate(
    model: nn.Module,
    float_model: nn.Module,
    data: Iterable[object],
    *,
    steps: int = 0,
    progress: Callable[[CalibrationStep], None] | None = None,
    lr: float = CALIBRATION_LR,
    temperature: float = CALIBRATION_TEMPERATURE,
    amp: str = "auto",
    bn_images: int | None = None,
    probe_images: int = PROBE_IMAGES,
) -> CalibrationResult:
    """Calibrate the converted ``model`` in place on unlabeled batches (docs/design.md 2.10).

    Args:
        model: an MCN from `convert`, on the device it will calibrate on.
        float_model: the float model it was converted from (never changed).
        data: a re-iterable of input batches (tensors or ``(x, ...)`` pairs), e.g. a
            `torch.utils.data.DataLoader` (`mcn_compress.calibration_data.calibration_data`).
        steps: label-free distillation steps after the BatchNorm recalibration (0: BatchNorm
            only; the CLI's default is `passes.distill.default_steps`).
        progress: called with a `CalibrationStep` after each batch and step.
        lr, temperature: the distillation's AdamW learning rate and KL temperature.
        amp: autocast of the distillation's forward passes: ``"auto"`` (bfloat16 where the
            device computes it natively), ``"bf16"`` or ``"off"`` (`amp.autocast_dtype`).
            The BatchNorm recalibration and the KL probes run in float32.
        bn_images: images each BatchNorm recalibration reads (None: one whole pass; the CLI
            gives `defaults.default_bn_images`, 256 above 64x64).
        probe_images: images the KL probes read (the first calibration batches, read once
            with the float model's logits and kept for the probe after the distillation; the
            CLI gives `defaults.default_probe_images`, 128 above 64x64).

    Raises:
        ConfigError: ``steps`` < 0, an unknown ``amp``, no batches, or the distillation
            diverged.
    """
    if steps < 0:
        raise ConfigError(f"calibration steps must be >= 0, got {steps}")
    param = next(model.parameters(), None)
    autocast_dtype(param.device if param is not None else torch.device("cpu"), amp)  # checks
    if iter(data) is data:  # a one-shot iterator: keep its batches for the distillation
        data = list(data)
    seen = 0

    def on_images(count: int) -> None:
        nonlocal seen
        seen += count
        if progress is not None:
            progress(CalibrationStep("batchnorm", seen))

    def on_step(step: int, kl: float) -> None:
        if progress is not None:
            progress(CalibrationStep("distill", step, steps, kl))

    try:
        images = recalibrate_batchnorm(model, data, progress=on_images, max_images=bn_images)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    probe = probe_batches(float_model, data, probe_images)
    before = kl_on_probe(model, probe)
    precision = None
    if steps:
        distilled = distill_from_float(
            model,
            float_model,
            data,
            steps,
            progress=on_step,
            lr=lr,
            temperature=temperature,
            amp=amp,
            bn_images=bn_images,
        )
        precision = distilled.precision
        images = max(images, distilled.images)  # distinct images read, by either step
    kl = (before, kl_on_probe(model, probe) if steps else before)
    result = CalibrationResult(images, steps, kl, precision)
    summary = info_of(model).summary
    if summary is not None:
        summary = dataclasses.replace(
            summary, calibration_images=images, calibration_steps=steps, calibration_kl=kl
        )
        update_info(model, summary=summary)
    return result


__all__ = ["CalibrationResult", "CalibrationStep", "calibrate"]
