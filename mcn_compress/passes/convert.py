"""`convert()`: float model -> MCN, through the pass of the config's width (docs/design.md
section 2, "Two ways to map a pretrained conv").

The pass is looked up in `WIDTH_PASSES` (``keep``: `passes.keep.convert_keep`, ``expand``:
`passes.expand.expand_model`); every pass traces the model with torch.fx, applies the layer
policy (`passes.policy`, narrowed by an optional ``filter_fn``), rewrites a copy and records a
`ConversionSummary`. Calibration on unlabeled images is a separate step
(`passes.calibration.calibrate`). `rebuild` converts exactly a checkpoint's layers, for `load`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from torch import nn

from mcn_compress.config import MCNConfig
from mcn_compress.passes.expand import expand_model
from mcn_compress.passes.keep import convert_keep
from mcn_compress.passes.policy import FilterFn

ProgressFn = Callable[[str, int, int], None]
"""``progress(layer_name, index, total)``, called after each converted layer."""


class ConversionPass(Protocol):
    """A width's pass: a converted copy of ``model`` carrying ``mcn_info`` config and summary."""

    def __call__(
        self,
        model: nn.Module,
        config: MCNConfig,
        *,
        filter_fn: FilterFn | None = None,
        layers: Sequence[str] | None = None,
        initialize: bool = True,
        progress: ProgressFn | None = None,
    ) -> nn.Module: ...


WIDTH_PASSES: dict[str, ConversionPass] = {"keep": convert_keep, "expand": expand_model}
"""The conversion pass of each ``MCNConfig.width``."""


def convert(
    model: nn.Module,
    config: MCNConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    progress: ProgressFn | None = None,
) -> nn.Module:
    """Return a new model in which every eligible conv is an `MCConv2d`; ``model`` is untouched.

    Args:
        model: a float classifier (timm, torchvision or any `nn.Module`).
        config: conversion settings; `MCNConfig()` (K = 4, width keep) when None.
        filter_fn: ``filter_fn(module, name) -> bool``; a conv the policy would convert stays
            float when it returns False (listed with the reason "refused by filter_fn").
        progress: called as ``progress(layer_name, index, total)`` after each converted layer.

    Returns:
        The converted model; ``info_of(model)`` (`mcn_compress.info`) gives its `MCNConfig`
        and `ConversionSummary`. In width keep it keeps the original's class and methods; with
        ``width="expand"`` it is an `fx.GraphModule` (`passes.expand.expand_model`). Calibrate
        it on unlabeled images with `passes.calibration.calibrate`.

    Example:
        >>> import timm
        >>> mcn = convert(timm.create_model("resnet18"), MCNConfig(planes=4))
        >>> len(info_of(mcn).summary.converted)
        19
        >>> no_layer4 = convert(model, filter_fn=lambda m, name: not name.startswith("layer4"))
    """
    config = config or MCNConfig()
    return WIDTH_PASSES[config.width](model, config, filter_fn=filter_fn, progress=progress)


def rebuild(model: nn.Module, config: MCNConfig, layers: Sequence[str]) -> nn.Module:
    """``model`` converted at exactly the conv names ``layers`` (a checkpoint's list), without
    fitting signs and M (the caller loads every parameter next)."""
    return WIDTH_PASSES[config.width](model, config, layers=layers, initialize=False)


__all__ = ["WIDTH_PASSES", "ConversionPass", "ProgressFn", "convert", "rebuild"]
