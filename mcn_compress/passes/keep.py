"""``width: keep``: swap each chosen conv for an `MCConv2d` of the same shape (docs/design.md
section 2), initialised by least squares from the pretrained filters."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mcn_compress.config import MCNConfig
from mcn_compress.errors import ConversionError
from mcn_compress.info import update_info
from mcn_compress.module_utils import set_submodule
from mcn_compress.nn.init import relative_error
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.policy import (
    FilterFn,
    LayerDecision,
    analyse_model,
    fixed_decisions,
    plan_conversion,
)
from mcn_compress.passes.summary import ConversionSummary, LayerRecord
from mcn_compress.passes.tracing import called_modules, trace


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


def convert_keep(
    model: nn.Module,
    config: MCNConfig,
    *,
    filter_fn: FilterFn | None = None,
    layers: Sequence[str] | None = None,
    initialize: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> nn.Module:
    """The ``width: keep`` conversion of ``model`` (not mutated): a deep copy in which every
    conv the policy chooses (or every conv in ``layers``) is an `MCConv2d`, keeping the
    original's class, attributes and methods. Arguments as `mcn_compress.passes.convert`.
    """
    info = analyse_model(model)
    modules = dict(model.named_modules())
    if layers is None:
        decisions = plan_conversion(model, config, info, filter_fn)
    else:
        decisions = fixed_decisions(model, list(layers), info)
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
            set_submodule(new_model, decision.name, mc)
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
    update_info(new_model, config=config, summary=summary)
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
