"""The conversion pass: float model -> MCN (DESIGN.md section 2, "Which layers convert").

`convert(model, config)` traces the model with torch.fx (MCConv2d and timm's untraceable
layers as leaves) to find every conv in execution order, decides per conv by the layer policy
(`plan_conversion`, a pure function), then swaps the chosen convs for `MCConv2d` in a deep copy,
initialised by least squares from the pretrained filters. The copy keeps the original's class,
attributes and methods (timm `forward_features`, `get_classifier`, `pretrained_cfg`, ...); the
input model is never mutated. If FX cannot trace the model the pass falls back to module
registration order and says so in the summary.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mcn_compress.config import MCNConfig
from mcn_compress.errors import ConversionError
from mcn_compress.models import declared_classifier
from mcn_compress.nn.init import relative_error
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.summary import ConversionSummary, LayerRecord
from mcn_compress.tracing import called_modules, trace

_logger = logging.getLogger(__name__)

REASON_STEM = "stem (first conv of the network)"
REASON_CLASSIFIER = "classifier"


@dataclass(frozen=True)
class LayerDecision:
    """Whether the conv at ``name`` converts, and why not if it stays float."""

    name: str
    convert: bool
    reason: str = ""


@dataclass(frozen=True)
class ModelGraphInfo:
    """What tracing tells the policy: conv names in execution order, stem and classifier."""

    conv_order: list[str]
    called: frozenset[str]
    stem: str | None
    classifiers: frozenset[str]
    traced: bool
    trace_error: str | None = None


def _classifier_names(model: nn.Module, module_order: Sequence[str]) -> frozenset[str]:
    """Names of the classifier module(s): timm's `get_classifier()` or the last Linear/Conv2d."""
    head = declared_classifier(model)
    if head is not None:
        base = {id(m): name for name, m in model.named_modules()}.get(id(head))
        if base is None:
            return frozenset()
        return frozenset(
            f"{base}.{sub}" if sub else base
            for sub, m in head.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)
        )
    modules = dict(model.named_modules())
    heads = [n for n in module_order if isinstance(modules.get(n), nn.Conv2d | nn.Linear)]
    return frozenset(heads[-1:])


def analyse_model(model: nn.Module) -> ModelGraphInfo:
    """Trace ``model`` and list its convs in execution order (module order if tracing fails)."""
    all_convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        gm = trace(model)
    except Exception as exc:  # noqa: BLE001 - FX raises many types; any means "not traceable"
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _logger.warning(
            "FX could not trace %s (%s); using module order",
            type(model).__name__,
            message,
        )
        order = [n for n, _ in model.named_modules()]
        return ModelGraphInfo(
            conv_order=all_convs,
            called=frozenset(all_convs),
            stem=all_convs[0] if all_convs else None,
            classifiers=_classifier_names(model, order),
            traced=False,
            trace_error=message,
        )
    order = called_modules(gm)
    modules = dict(model.named_modules())
    called_convs = [n for n in order if isinstance(modules.get(n), nn.Conv2d)]
    unused = [n for n in all_convs if n not in set(called_convs)]
    return ModelGraphInfo(
        conv_order=called_convs + unused,
        called=frozenset(called_convs),
        stem=called_convs[0] if called_convs else None,
        classifiers=_classifier_names(model, order),
        traced=True,
    )


def _decide(
    name: str, conv: nn.Conv2d, info: ModelGraphInfo, config: MCNConfig, called: bool
) -> LayerDecision:
    k = config.planes
    if type(conv) is not nn.Conv2d:
        return LayerDecision(
            name,
            False,
            f"{type(conv).__name__} has its own forward; only nn.Conv2d converts",
        )
    if not called:
        return LayerDecision(name, False, "not called in forward")
    if name == info.stem:
        return LayerDecision(name, False, REASON_STEM)
    if name in info.classifiers:
        return LayerDecision(name, False, REASON_CLASSIFIER)
    if config.include and not any(re.search(p, name) for p in config.include):
        return LayerDecision(name, False, "not matched by --only")
    for pattern in config.exclude:
        if re.search(pattern, name):
            return LayerDecision(name, False, f"matched --keep {pattern!r}")
    if conv.padding_mode != "zeros":
        return LayerDecision(name, False, f"padding_mode {conv.padding_mode!r} not supported")
    if conv.groups > 1:
        if conv.groups == conv.in_channels:
            return LayerDecision(name, False, f"depthwise conv (groups={conv.groups})")
        if not config.grouped:
            return LayerDecision(name, False, f"grouped conv (groups={conv.groups})")
        per_in, per_out = (
            conv.in_channels // conv.groups,
            conv.out_channels // conv.groups,
        )
        if per_in % k or per_out % k:
            return LayerDecision(
                name,
                False,
                f"per-group channels ({per_in}, {per_out}) not divisible by K={k}",
            )
    if conv.in_channels % k or conv.out_channels % k:
        return LayerDecision(
            name,
            False,
            f"channels ({conv.in_channels}, {conv.out_channels}) not divisible by K={k}",
        )
    return LayerDecision(name, True)


def plan_conversion(
    model: nn.Module, config: MCNConfig, info: ModelGraphInfo | None = None
) -> list[LayerDecision]:
    """Apply the layer policy to every `nn.Conv2d` of ``model``, in execution order."""
    info = info or analyse_model(model)
    modules = dict(model.named_modules())
    return [
        _decide(name, modules[name], info, config, name in info.called) for name in info.conv_order
    ]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _record(
    name: str,
    conv: nn.Conv2d,
    decision: LayerDecision,
    mc: MCConv2d | None,
    initialised: bool,
) -> LayerRecord:
    rel_error = None
    if mc is not None and initialised:
        with torch.no_grad():
            rel_error = relative_error(conv.weight, mc.reconstruct()) or 0.0
    return LayerRecord(
        name=name,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=(int(conv.kernel_size[0]), int(conv.kernel_size[1])),
        groups=conv.groups,
        converted=mc is not None,
        reason=decision.reason,
        rel_error=rel_error,
        weight_params=conv.weight.numel(),
        binary_params=mc.weight.numel() if mc is not None else 0,
        mfilter_params=mc.mfilter.numel() if mc is not None else 0,
    )


def convert(
    model: nn.Module,
    config: MCNConfig | None = None,
    *,
    calibration: Iterable[object] | None = None,
    calibration_batches: int | None = None,
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
        layers: convert exactly these conv names, bypassing the policy (used by `load`).
        initialize: fit signs and M to the float filters (False leaves a fresh init, for loads
            that overwrite every parameter anyway).
        progress: called as ``progress(layer_name, index, total)`` after each converted layer.

    Returns:
        The converted model, with ``mcn_config`` (`MCNConfig`) and ``mcn_summary``
        (`ConversionSummary`) attributes. With ``width="expand"`` it is an `fx.GraphModule`
        built by `mcn_compress.expand.expand_model` (the original class's methods are not kept).

    Example:
        >>> import timm
        >>> mcn = convert(timm.create_model("resnet18"), MCNConfig(planes=4))
        >>> len(mcn.mcn_summary.converted)
        19
    """
    config = config or MCNConfig()
    if config.width == "expand":
        from mcn_compress.expand import expand_model

        return expand_model(
            model,
            config,
            calibration=calibration,
            calibration_batches=calibration_batches,
            layers=layers,
            initialize=initialize,
            progress=progress,
        )
    info = analyse_model(model)
    modules = dict(model.named_modules())
    if layers is None:
        decisions = plan_conversion(model, config, info)
    else:
        wanted = list(layers)
        missing = [n for n in wanted if not isinstance(modules.get(n), nn.Conv2d)]
        if missing:
            raise ConversionError(f"model has no Conv2d named {', '.join(missing[:5])}")
        chosen = set(wanted)
        decisions = [
            LayerDecision(n, n in chosen, "" if n in chosen else "float in the checkpoint")
            for n in info.conv_order
        ]
    to_convert = [d.name for d in decisions if d.convert]
    if not to_convert:
        raise ConversionError(
            f"nothing to convert in {type(model).__name__}: no conv passes the policy "
            f"(K={config.planes}); check --only/--keep or try a smaller K"
        )
    new_model = copy.deepcopy(model)
    records: list[LayerRecord] = []
    done = 0
    for decision in decisions:
        conv = modules[decision.name]
        assert isinstance(conv, nn.Conv2d)
        mc: MCConv2d | None = None
        if decision.convert:
            try:
                mc = _build_layer(conv, config, initialize)
            except ValueError as exc:
                raise ConversionError(f"cannot convert {decision.name}: {exc}") from exc
            _set_submodule(new_model, decision.name, mc)
            done += 1
            if progress is not None:
                progress(decision.name, done, len(to_convert))
        records.append(_record(decision.name, conv, decision, mc, initialize))
    summary = ConversionSummary(
        planes=config.planes,
        width=config.width,
        mcn1=config.mcn1,
        layers=records,
        traced=info.traced,
        trace_error=info.trace_error,
        total_params=sum(p.numel() for p in new_model.parameters()),
    )
    if info.traced:
        _check_rewrite(new_model, to_convert)
    if calibration is not None:
        from mcn_compress.calibrate import recalibrate_batchnorm

        recalibrate_batchnorm(new_model, calibration, max_batches=calibration_batches)
    new_model.mcn_config = config  # type: ignore[assignment]
    new_model.mcn_summary = summary  # type: ignore[assignment]
    return new_model


def _build_layer(conv: nn.Conv2d, config: MCNConfig, initialize: bool) -> MCConv2d:
    options = {"planes": config.planes, "mcn1": config.mcn1, "clip": config.clip}
    if initialize:
        mc = MCConv2d.from_conv2d(conv, init_iters=config.init_iters, **options)
    else:
        mc = MCConv2d.like_conv2d(conv, **options)
    mc.train(conv.training)
    return mc


def _check_rewrite(new_model: nn.Module, converted: Sequence[str]) -> None:
    """Re-trace the converted model: every converted name must be a called `MCConv2d`."""
    called = set(called_modules(trace(new_model)))
    modules = dict(new_model.named_modules())
    bad = [n for n in converted if n not in called or not isinstance(modules.get(n), MCConv2d)]
    if bad:
        raise ConversionError(f"rewrite check failed for {', '.join(bad[:5])}")
