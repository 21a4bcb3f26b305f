"""``width: expand``: the paper's widened MCN as a torch.fx pass (docs/design.md section 2).

Every converted conv keeps each pretrained filter as one binary filter over K-times wider
tensors: tensor channel ``g*K + k`` is plane ``k`` of feature map ``g`` (Table 3.1 of the MCN
chapter). The pass

1. traces the model (`MCConv2d`, timm's untraceable layers and every BatchNorm as leaves);
2. finds the widened region (`plan_expansion`, a pure function of the graph): every node on a
   path from a converted conv to a converted conv, extended downstream through pointwise ops
   (BatchNorm, activations, residual adds) up to the first op that is not (global pooling,
   flatten, the head). Ops in the region that cannot be widened raise `ConversionError`
   naming the node, before any weight is touched;
3. rewrites it: converted convs become ``MCConv2d(in*K, out*K)``; float convs, BatchNorm and
   other per-channel modules are widened so that on K equal planes they compute exactly what
   the float model computes; every tensor entering the region is replicated K times (the
   chapter's "RRRR") and every tensor leaving it is averaged over each map's K planes, so the
   classifier and everything after the region are unchanged.

The result is an `fx.GraphModule`: shapes change, so the original class's methods cannot be
kept. Its ``forward`` is the model's ``forward``; timm API methods (``forward_features``,
``get_classifier``, ...) are not available in expand mode. It carries ``mcn_info``
(source, config, summary) and, when present, ``pretrained_cfg`` and ``default_cfg``, so
checkpoints and packed files rebuild it like a keep-mode model. Python branches on
``self.training`` inside traced (non-leaf) modules are fixed at the mode the model had when it
was converted (BatchNorm, Dropout and timm's DropPath are leaves and keep both modes).

Initialisation (`fit_expanded`): on K equal input planes a widened MCConv2d computes, for
output plane j, the filters ``W_j[h, c] = M[j] * S[h, c]`` with ``S = sum_k B[h, c*K + k]``, a
(K+1)-level quantization of W0. Signs and M are fitted to W0 by alternating closed-form steps;
the K planes of M differ by a small deterministic spread, and the signs of a map's planes
follow rotated thresholds, so the planes are never copies of one another.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from mcn_compress.config import MCNConfig
from mcn_compress.errors import ConversionError
from mcn_compress.info import update_info
from mcn_compress.module_utils import set_submodule
from mcn_compress.nn.expand_init import PLANE_SPREAD, expanded_error
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.policy import (
    FilterFn,
    LayerDecision,
    analyse_model,
    fixed_decisions,
    plan_conversion,
)
from mcn_compress.passes.summary import ConversionSummary, LayerRecord
from mcn_compress.passes.tracing import MCNTracer, trace
from mcn_compress.passes.widen import (
    RULE_COMPOSITE,
    RULE_CONV,
    RULE_NORM,
    extra_leaves,
    node_rule,
    parameterless,
    unwidenable,
    widen_conv,
    widen_mcconv,
    widen_norm_,
)

_logger = logging.getLogger(__name__)


COPIED_ATTRIBUTES = ("mcn_info", "pretrained_cfg", "default_cfg", "num_classes")
"""Attributes of the float model copied onto the widened `fx.GraphModule`."""


# --- widening rules per op type -------------------------------------------------------------


@dataclass(frozen=True)
class ExpansionPlan:
    """What the rewrite does, by node name (`plan_expansion`).

    ``widened``: nodes whose output is K times wider, in graph order; ``rules``: the widening
    rule of each of them; ``entries``: ``(producer, first widened consumer)`` for every tensor
    replicated into the region; ``exits``: ``(producer, first outside consumer)`` for every
    tensor averaged over planes on its way out.
    """

    widened: tuple[str, ...]
    rules: dict[str, str]
    entries: tuple[tuple[str, str], ...]
    exits: tuple[tuple[str, str], ...]


def _closure(
    starts: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]
) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(step(node))
    return seen


def _is_scalar_attr(node: fx.Node, root: nn.Module | None) -> bool:
    if root is None:
        return False
    value: Any = root
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return isinstance(value, torch.Tensor) and value.numel() == 1


def plan_expansion(
    graph: fx.Graph,
    modules: dict[str, nn.Module],
    converted: frozenset[str],
    root: nn.Module | None = None,
) -> ExpansionPlan:
    """Find the widened region of ``graph`` for the ``converted`` conv names (pure function).

    The region is every node that is both downstream and upstream of a converted conv (a conv
    inside a known composite leaf counts for the leaf), extended downstream through pointwise
    nodes. Every region node must have a widening rule; ``root`` resolves ``get_attr`` operands
    (only scalar constants may enter the region). Raises `ConversionError` naming the first
    node that cannot be widened, or the converted convs the graph never calls.
    """
    nodes = list(graph.nodes)
    seeds: list[fx.Node] = []
    found: set[str] = set()
    for node in nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        inner = {n for n in converted if n == target or n.startswith(target + ".")}
        if inner:
            seeds.append(node)
            found |= inner
    missing = sorted(converted - found)
    if missing:
        raise ConversionError(
            f"width 'expand': the traced graph never calls {', '.join(missing[:5])}"
        )
    down = _closure(seeds, lambda n: n.users)
    up = _closure(seeds, lambda n: n.all_input_nodes)
    region: set[fx.Node] = {n for n in nodes if n in down and n in up}
    rules: dict[str, str] = {}
    for node in nodes:
        if node in region:
            rules[node.name] = node_rule(node, modules, converted)[0]
        elif (
            node in down
            and node.op in ("call_module", "call_function", "call_method")
            and any(i in region for i in node.all_input_nodes)
        ):
            try:
                rule, pointwise = node_rule(node, modules, converted)
            except ConversionError:
                continue  # not widenable: the region ends before it
            if pointwise:
                region.add(node)
                rules[node.name] = rule
    calls: dict[str, set[bool]] = {}
    for node in nodes:
        if node.op == "call_module" and not parameterless(modules[str(node.target)]):
            calls.setdefault(str(node.target), set()).add(node in region)
    for node in nodes:
        if node.op == "call_module" and len(calls.get(str(node.target), ())) > 1:
            raise unwidenable(node, modules, "its weights are used inside and outside the region")
    entries: dict[str, str] = {}
    exits: dict[str, str] = {}
    for node in nodes:
        if node in region:
            for source in node.all_input_nodes:
                if source in region:
                    continue
                if source.op == "get_attr":
                    if not _is_scalar_attr(source, root):
                        raise unwidenable(
                            node, modules, f"its operand {source.target!r} is a constant tensor"
                        )
                    continue
                entries.setdefault(source.name, node.name)
        else:
            for source in node.all_input_nodes:
                if source in region:
                    exits.setdefault(source.name, node.name)
    widened = tuple(n.name for n in nodes if n in region)
    return ExpansionPlan(widened, rules, tuple(entries.items()), tuple(exits.items()))


# --- initialisation -------------------------------------------------------------------------


# --- widening modules -----------------------------------------------------------------------


# --- the pass -------------------------------------------------------------------------------
def _decisions(
    model: nn.Module,
    config: MCNConfig,
    layers: Sequence[str] | None,
    filter_fn: FilterFn | None = None,
) -> list[LayerDecision]:
    info = analyse_model(model)
    if not info.traced:
        raise ConversionError(
            f"width 'expand' rewrites the graph and needs a model torch.fx can trace "
            f"({info.trace_error}); use width 'keep'"
        )
    if layers is None:
        # Widened channel counts are multiples of K: the keep policy with K = 1 decides.
        policy = dataclasses.replace(config, planes=1, width="keep")
        return plan_conversion(model, policy, info, filter_fn)
    return fixed_decisions(model, list(layers), info)


def _rewrite_graph(gm: fx.GraphModule, plan: ExpansionPlan, planes: int) -> None:
    """Insert the replications into and the plane means out of the region; recompile."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    widened = set(plan.widened)
    for producer, consumer in plan.entries:
        source = by_name[producer]
        users = [u for u in source.users if u.name in widened]
        with graph.inserting_before(by_name[consumer]):
            replicated = graph.call_function(torch.repeat_interleave, (source, planes), {"dim": 1})
        for user in users:
            user.replace_input_with(source, replicated)
    for producer, consumer in plan.exits:
        source = by_name[producer]
        users = [u for u in source.users if u.name not in widened]
        with graph.inserting_before(by_name[consumer]):
            split = graph.call_method("unflatten", (source, 1, (-1, planes)))
            averaged = graph.call_method("mean", (split, 2))
        for user in users:
            user.replace_input_with(source, averaged)
    graph.lint()
    gm.recompile()


def expand_model(
    model: nn.Module,
    config: MCNConfig,
    *,
    filter_fn: FilterFn | None = None,
    layers: Sequence[str] | None = None,
    initialize: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    binarize: bool = True,
    spread: float = PLANE_SPREAD,
) -> fx.GraphModule:
    """The ``width: expand`` conversion of ``model`` (not mutated); see the module docstring.

    Arguments as `mcn_compress.passes.convert`; ``binarize=False`` widens the
    converted convs as float convs instead (`widen_conv`): the widened float network, which
    equals ``model`` on every input, for testing the widening rules. ``spread`` is the
    relative spread of the K M-Filter planes at init (`plane_factors`).

    Example:
        >>> import timm
        >>> wide = expand_model(timm.create_model("resnet18"), MCNConfig(width="expand", planes=2))
        >>> wide(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    k = config.planes
    decisions = _decisions(model, config, layers, filter_fn)
    to_convert = [d.name for d in decisions if d.convert]
    if not to_convert:
        raise ConversionError(
            f"nothing to convert in {type(model).__name__}: no conv passes the policy; "
            "check --only/--keep"
        )
    originals = dict(model.named_modules())
    work = copy.deepcopy(model)
    try:
        gm = trace(work, MCNTracer(extra_leaves=extra_leaves()))
    except Exception as exc:
        raise ConversionError(
            f"width 'expand' cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    modules = dict(gm.named_modules())
    plan = plan_expansion(gm.graph, modules, frozenset(to_convert), root=gm)
    # --- the plan holds: widen the modules (weights are touched from here on) ---------------
    converted: dict[str, MCConv2d | nn.Conv2d] = {}
    for index, name in enumerate(to_convert, start=1):
        conv = modules[name]
        assert isinstance(conv, nn.Conv2d)
        try:
            converted[name] = (
                widen_mcconv(conv, config, initialize, spread) if binarize else widen_conv(conv, k)
            )
        except ValueError as exc:
            raise ConversionError(f"cannot convert {name}: {exc}") from exc
        set_submodule(gm, name, converted[name])
        if progress is not None:
            progress(name, index, len(to_convert))
    widened_float: dict[str, nn.Conv2d] = {}
    norms_done: set[str] = set()
    by_name = {n.name: n for n in gm.graph.nodes}
    for node_name in plan.widened:
        rule = plan.rules[node_name]
        target = str(by_name[node_name].target)
        if rule == RULE_CONV and target not in widened_float:
            conv = modules[target]
            assert isinstance(conv, nn.Conv2d)
            widened_float[target] = widen_conv(conv, k)
            set_submodule(gm, target, widened_float[target])
        elif rule == RULE_NORM and target not in norms_done:
            widen_norm_(modules[target], k)
            norms_done.add(target)
        elif rule == RULE_COMPOSITE:
            for sub, child in list(modules[target].named_modules()):
                full = f"{target}.{sub}"
                if sub and full not in converted and full not in widened_float:
                    if type(child) is nn.Conv2d:
                        widened_float[full] = widen_conv(child, k)
                        set_submodule(gm, full, widened_float[full])
    _rewrite_graph(gm, plan, k)
    widened_float.update({n: c for n, c in converted.items() if not isinstance(c, MCConv2d)})
    records = [
        _expand_record(d, originals[d.name], converted.get(d.name), widened_float, initialize, k)
        for d in decisions
    ]
    summary = ConversionSummary(
        planes=k,
        width=config.width,
        mcn1=config.mcn1,
        layers=records,
        traced=True,
        total_params=sum(p.numel() for p in gm.parameters()),
    )
    _logger.info(
        "width expand K=%d: %d nodes widened, %d entries replicated, %d exits averaged",
        k,
        len(plan.widened),
        len(plan.entries),
        len(plan.exits),
    )
    for attr in COPIED_ATTRIBUTES:
        if hasattr(model, attr):
            setattr(gm, attr, copy.deepcopy(getattr(model, attr)))
    gm.train(model.training)
    update_info(gm, config=config, summary=summary)
    return gm


def _expand_record(
    decision: LayerDecision,
    conv: nn.Module,
    new: MCConv2d | nn.Conv2d | None,
    widened_float: dict[str, nn.Conv2d],
    initialised: bool,
    planes: int,
) -> LayerRecord:
    """The summary row of one conv: sizes of the original, bits and error of the widened."""
    assert isinstance(conv, nn.Conv2d)
    rel_error = None
    mc = new if isinstance(new, MCConv2d) else None
    if mc is not None and initialised:
        with torch.no_grad():
            rel_error = expanded_error(conv.weight, mc.reconstruct(), planes)
    reason = decision.reason
    wide = widened_float.get(decision.name)
    if mc is None and wide is not None:
        note = f"widened float ({wide.weight.numel()} weights)"
        reason = f"{reason}; {note}" if reason else note
    return LayerRecord(
        name=decision.name,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=(int(conv.kernel_size[0]), int(conv.kernel_size[1])),
        groups=conv.groups,
        converted=mc is not None,
        reason=reason,
        rel_error=rel_error,
        weight_params=conv.weight.numel(),
        binary_params=mc.weight.numel() if mc is not None else 0,
        mfilter_params=mc.mfilter.numel() if mc is not None else 0,
    )
