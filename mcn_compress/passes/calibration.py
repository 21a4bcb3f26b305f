"""`calibrate()`: make a converted model usable before any labelled training (docs/design.md
section 2.10), on unlabeled images only.

Two steps on the same batches: BatchNorm recalibration (`passes.calibrate`, no weight changes),
then ``steps`` of label-free distillation from the float original (`passes.distill`). The model
changes in place; what was done is returned and recorded in its `ConversionSummary`
(``info_of(model).summary``), which checkpoints store and ``report`` shows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from torch import nn

from mcn_compress.errors import ConfigError
from mcn_compress.info import info_of, update_info
from mcn_compress.passes.calibrate import recalibrate_batchnorm
from mcn_compress.passes.distill import distill_from_float


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
    """What `calibrate` did: ``images`` distinct images, ``steps`` distillation steps and the
    KL to the float model at the first and the last step (None without distillation)."""

    images: int
    steps: int
    kl: tuple[float, float] | None = None


def calibrate(
    model: nn.Module,
    float_model: nn.Module,
    data: Iterable[object],
    *,
    steps: int = 0,
    progress: Callable[[CalibrationStep], None] | None = None,
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

    Raises:
        ConfigError: ``steps`` < 0, no batches, or the distillation diverged.
    """
    if steps < 0:
        raise ConfigError(f"calibration steps must be >= 0, got {steps}")
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
        images = recalibrate_batchnorm(model, data, progress=on_images)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    kl: tuple[float, float] | None = None
    if steps:
        distilled = distill_from_float(model, float_model, data, steps, progress=on_step)
        kl = (distilled.kl_start, distilled.kl_end)
    result = CalibrationResult(images, steps, kl)
    summary = info_of(model).summary
    if summary is not None:
        summary = dataclasses.replace(
            summary, calibration_images=images, calibration_steps=steps, calibration_kl=kl
        )
        update_info(model, summary=summary)
    return result


__all__ = ["CalibrationResult", "CalibrationStep", "calibrate"]
