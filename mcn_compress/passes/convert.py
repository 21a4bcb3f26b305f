"""`convert()`: float model -> MCN, through the pass of the config's width (docs/design.md
section 2, "Two ways to map a pretrained conv").

The pass is looked up in `WIDTH_PASSES` (``keep``: `passes.keep.convert_keep`, ``expand``:
`passes.expand.expand_model`); every pass traces the model with torch.fx, applies the layer
policy (`passes.policy`), rewrites a copy and records a `ConversionSummary`. BatchNorm
recalibration on unlabeled images (`passes.calibrate`) runs after whichever pass ran, then
optionally label-free distillation from the float original on the same images
(`passes.distill`, docs/design.md section 2.10).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from torch import nn

from mcn_compress.config import MCNConfig
from mcn_compress.errors import ConfigError
from mcn_compress.info import info_of, update_info
from mcn_compress.passes.calibrate import recalibrate_batchnorm
from mcn_compress.passes.distill import DEFAULT_STEPS, distill_from_float
from mcn_compress.passes.expand import expand_model
from mcn_compress.passes.keep import convert_keep


class ConversionPass(Protocol):
    """A width's pass: a converted copy of ``model`` carrying ``mcn_info`` config and summary."""

    def __call__(
        self,
        model: nn.Module,
        config: MCNConfig,
        *,
        layers: Sequence[str] | None = None,
        initialize: bool = True,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> nn.Module: ...


WIDTH_PASSES: dict[str, ConversionPass] = {"keep": convert_keep, "expand": expand_model}
"""The conversion pass of each ``MCNConfig.width``."""


def convert(
    model: nn.Module,
    config: MCNConfig | None = None,
    *,
    calibration: Iterable[object] | None = None,
    calibration_batches: int | None = None,
    calibration_progress: Callable[[int], None] | None = None,
    calibration_steps: int = 0,
    distill_progress: Callable[[int, float], None] | None = None,
    layers: Sequence[str] | None = None,
    initialize: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> nn.Module:
    """Return a new model in which every eligible conv is an `MCConv2d`; ``model`` is untouched.

    Args:
        model: a float classifier (timm, torchvision or any `nn.Module`).
        config: conversion settings; `MCNConfig()` (K = 4, width keep) when None.
        calibration: optional iterable of input batches (tensors or ``(x, y)`` pairs); when
            given, BatchNorm running statistics are re-estimated on it after conversion.
        calibration_batches: at most this many calibration batches.
        calibration_progress: called with the number of images of each calibration batch.
        calibration_steps: label-free distillation steps from ``model`` on the calibration
            batches after the BatchNorm recalibration (`passes.distill.distill_from_float`;
            0, the default here, recalibrates BatchNorm only; the CLI's default is
            `passes.distill.DEFAULT_STEPS`). The batches are iterated again as needed.
        distill_progress: called as ``distill_progress(step, kl)`` after each distillation step.
        layers: convert exactly these conv names, bypassing the policy (used by `load`).
        initialize: fit signs and M to the float filters (False leaves a fresh init, for loads
            that overwrite every parameter anyway).
        progress: called as ``progress(layer_name, index, total)`` after each converted layer.

    Returns:
        The converted model; ``info_of(model)`` (`mcn_compress.info`) gives its `MCNConfig`
        and `ConversionSummary`. In width keep it keeps the original's class and methods; with
        ``width="expand"`` it is an `fx.GraphModule` (`passes.expand.expand_model`).

    Example:
        >>> import timm
        >>> mcn = convert(timm.create_model("resnet18"), MCNConfig(planes=4))
        >>> len(info_of(mcn).summary.converted)
        19
    """
    config = config or MCNConfig()
    if calibration_steps < 0:
        raise ConfigError(f"calibration_steps must be >= 0, got {calibration_steps}")
    if calibration_steps and calibration is None:
        raise ConfigError("calibration_steps needs calibration data")
    new_model = WIDTH_PASSES[config.width](
        model, config, layers=layers, initialize=initialize, progress=progress
    )
    if calibration is None:
        return new_model
    if calibration_batches is not None:
        calibration = _first(calibration, calibration_batches)
    images = recalibrate_batchnorm(new_model, calibration, progress=calibration_progress)
    kl: tuple[float, float] | None = None
    if calibration_steps:
        result = distill_from_float(
            new_model, model, calibration, calibration_steps, progress=distill_progress
        )
        kl = (result.kl_start, result.kl_end)
    summary = info_of(new_model).summary
    if summary is not None:
        summary = dataclasses.replace(
            summary,
            calibration_images=images,
            calibration_steps=calibration_steps,
            calibration_kl=kl,
        )
        update_info(new_model, summary=summary)
    return new_model


class _first:
    """The first ``limit`` batches of ``batches``, re-iterable when ``batches`` is."""

    def __init__(self, batches: Iterable[object], limit: int) -> None:
        self.batches = list(batches) if iter(batches) is batches else batches
        self.limit = limit

    def __iter__(self) -> Iterator[object]:
        for index, batch in enumerate(self.batches):
            if index >= self.limit:
                return
            yield batch


__all__ = ["DEFAULT_STEPS", "WIDTH_PASSES", "ConversionPass", "convert"]
