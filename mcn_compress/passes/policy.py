"""The layer policy: which convs of a float model convert (docs/design.md section 2.8).

`analyse_model` traces the model with torch.fx (MCConv2d and timm's untraceable layers as
leaves) to list every conv in execution order and find the stem and the classifier; if FX
cannot trace it, module registration order stands in and the result says so.
`plan_conversion` (a pure function) then decides per conv, with the reason for every conv that
stays float; a user's ``filter_fn(module, name)`` can refuse more. `fixed_decisions` converts
exactly a checkpoint's list instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from mcn_compress.config import MCNConfig
from mcn_compress.errors import ConversionError, first_line
from mcn_compress.passes.tracing import called_modules, trace

_logger = logging.getLogger(__name__)

REASON_STEM = "stem (first conv of the network)"
REASON_CLASSIFIER = "classifier"
REASON_FILTER = "refused by filter_fn"

FilterFn = Callable[[nn.Module, str], bool]
"""``filter_fn(module, name)``: whether the conv at ``name`` may convert (as torchao's
``quantize_(model, config, filter_fn)``); it is asked only about convs the policy would
convert."""


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


def declared_classifier(model: nn.Module) -> nn.Module | None:
    """The module timm's ``get_classifier()`` returns, or None when the model has no usable one."""
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return None
    try:
        head = get_classifier()
    except Exception:  # noqa: BLE001 - any failure means "no usable answer"
        return None
    return head if isinstance(head, nn.Module) else None


def find_classifier(
    model: nn.Module, order: Sequence[str] | None = None
) -> tuple[str | None, nn.Module] | None:
    """The classifier of ``model`` and its module name (docs/design.md section 2).

    timm's ``get_classifier()`` when it returns a module other than Identity, else the last
    `nn.Linear` or `nn.Conv2d` in ``order`` (module names; registration order by default, the
    traced execution order for the policy). The name is None for a declared head that is not a
    submodule; the result is None when there is no candidate.
    """
    head = declared_classifier(model)
    if head is not None and not isinstance(head, nn.Identity):
        return {id(m): name for name, m in model.named_modules()}.get(id(head)), head
    modules = dict(model.named_modules())
    names = list(modules) if order is None else order
    heads = [n for n in names if isinstance(modules.get(n), nn.Conv2d | nn.Linear)]
    return (heads[-1], modules[heads[-1]]) if heads else None


def _classifier_names(model: nn.Module, module_order: Sequence[str]) -> frozenset[str]:
    """Names of the Linear / Conv2d modules of the classifier (`find_classifier`); none when
    timm's ``get_classifier()`` declares an Identity head (a feature extractor)."""
    if isinstance(declared_classifier(model), nn.Identity):
        return frozenset()
    found = find_classifier(model, module_order)
    if found is None or found[0] is None:
        return frozenset()
    base, head = found
    return frozenset(
        f"{base}.{sub}" if sub else base
        for sub, m in head.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    )


def analyse_model(model: nn.Module) -> ModelGraphInfo:
    """Trace ``model`` and list its convs in execution order (module order if tracing fails)."""
    all_convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        gm = trace(model)
    except Exception as exc:  # noqa: BLE001 - FX raises many types; any means "not traceable"
        message = f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"
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
    model: nn.Module,
    config: MCNConfig,
    info: ModelGraphInfo | None = None,
    filter_fn: FilterFn | None = None,
) -> list[LayerDecision]:
    """Apply the layer policy to every `nn.Conv2d` of ``model``, in execution order; a conv
    the policy would convert stays float when ``filter_fn(module, name)`` is false."""
    info = info or analyse_model(model)
    modules = dict(model.named_modules())
    decisions = []
    for name in info.conv_order:
        decision = _decide(name, modules[name], info, config, name in info.called)
        if decision.convert and filter_fn is not None and not filter_fn(modules[name], name):
            decision = LayerDecision(name, False, REASON_FILTER)
        decisions.append(decision)
    return decisions


def fixed_decisions(
    model: nn.Module, layers: Sequence[str], info: ModelGraphInfo
) -> list[LayerDecision]:
    """Decisions that convert exactly the convs named in ``layers`` (a checkpoint's list),
    bypassing the policy; a name that is not an `nn.Conv2d` of ``model`` raises."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if not isinstance(modules.get(n), nn.Conv2d)]
    if missing:
        raise ConversionError(f"model has no Conv2d named {', '.join(missing[:5])}")
    chosen = set(layers)
    return [
        LayerDecision(n, n in chosen, "" if n in chosen else "float in the checkpoint")
        for n in info.conv_order
    ]
