"""``width: expand``: the paper's widened MCN as a torch.fx pass (DESIGN.md section 2).

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
``get_classifier``, ...) are not available in expand mode. It carries ``mcn_config``,
``mcn_summary`` and, when present, ``mcn_source``, ``pretrained_cfg`` and ``default_cfg``, so
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
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mcn_compress.config import MCNConfig
from mcn_compress.convert import LayerDecision, analyse_model, plan_conversion
from mcn_compress.errors import ConversionError
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.nn.sign import hard_sign
from mcn_compress.summary import ConversionSummary, LayerRecord
from mcn_compress.tracing import MCNTracer, trace

_logger = logging.getLogger(__name__)

PLANE_SPREAD = 0.02
"""Relative spread of the K M-Filter planes at initialisation (planes ``1 -/+ PLANE_SPREAD/2``)."""

COPIED_ATTRIBUTES = ("mcn_source", "pretrained_cfg", "default_cfg", "num_classes")
"""Attributes of the float model copied onto the widened `fx.GraphModule`."""

_SCALE_CANDIDATES = (0.75, 1.0, 1.5, 2.0, 3.0)  # initial level steps, in units of rms(W0) / K
_FIT_SAMPLE_ROWS = 16384  # filter rows (h, c) the level scale is searched on

# --- widening rules per op type -------------------------------------------------------------
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout2d,
)
_SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)
_POINTWISE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        operator.add,
        operator.iadd,
        operator.sub,
        operator.isub,
        operator.mul,
        operator.imul,
        operator.truediv,
        operator.neg,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.neg,
        torch.abs,
        torch.exp,
        torch.sigmoid,
        torch.tanh,
        torch.relu,
        torch.clamp,
        F.relu,
        F.relu6,
        F.silu,
        F.gelu,
        F.sigmoid,
        F.hardsigmoid,
        F.hardswish,
        F.hardtanh,
        F.leaky_relu,
        F.elu,
        F.mish,
        F.softplus,
        F.dropout,
    }
)
_POINTWISE_METHODS = frozenset(
    {
        "add",
        "add_",
        "sub",
        "sub_",
        "mul",
        "mul_",
        "div",
        "div_",
        "neg",
        "abs",
        "exp",
        "sigmoid",
        "sigmoid_",
        "tanh",
        "tanh_",
        "relu",
        "relu_",
        "clamp",
        "clamp_",
        "clamp_min",
        "clamp_min_",
        "hardtanh",
        "hardtanh_",
        "contiguous",
        "clone",
        "detach",
        "float",
        "type_as",
    }
)
_SPATIAL_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.interpolate}
)
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin"})
_CHANNEL_DIMS = (1, -3)  # NCHW

RULE_MCN = "mcn"  # converted conv -> MCConv2d(in*K, out*K)
RULE_CONV = "conv"  # float conv -> widened float conv
RULE_NORM = "norm"  # BatchNorm / GroupNorm / PReLU -> per-channel tensors repeated K times
RULE_COMPOSITE = "composite"  # known leaf (timm ConvMlp): its convs and norms are widened
RULE_SAME = "same"  # pointwise or spatial op: unchanged


def _extra_leaves() -> tuple[type[nn.Module], ...]:
    """BatchNorm subclasses (timm's BatchNormAct2d, ...) and timm DropPath stay leaves."""
    leaves: list[type[nn.Module]] = [_BatchNorm]
    try:
        from timm.layers import DropPath

        leaves.append(DropPath)
    except ImportError:  # pragma: no cover - timm is a runtime dependency
        pass
    return tuple(leaves)


def _timm_pointwise() -> tuple[type[nn.Module], ...]:
    try:
        from timm.layers import DropPath
    except ImportError:  # pragma: no cover
        return ()
    return (DropPath,)


def _composite_types() -> tuple[type[nn.Module], ...]:
    """Leaf modules whose forward applies only per-channel ops around their own convs."""
    try:
        from timm.models.vgg import ConvMlp
    except ImportError:  # pragma: no cover
        return ()
    return (ConvMlp,)


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


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        module = getattr(node.target, "__module__", None)
        return f"function {module}.{name}" if module else f"function {name}"
    return f"{node.op} {node.target!r}"


def _unwidenable(node: fx.Node, modules: dict[str, nn.Module], why: str) -> ConversionError:
    return ConversionError(
        f"width 'expand' cannot widen node {node.name!r} ({_describe(node, modules)}): {why}; "
        "keep the convs around it float (--keep) or use width 'keep'"
    )


def _reduce_dims(node: fx.Node) -> tuple[int, ...] | None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dim, int):
        return (dim,)
    if isinstance(dim, list | tuple) and all(isinstance(d, int) for d in dim):
        return tuple(dim)
    return None


def _parameterless(module: nn.Module) -> bool:
    return not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())


def _check_norm_children(node: fx.Node, module: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, child in module.named_children():
        if not _parameterless(child):
            raise _unwidenable(node, modules, f"its submodule {name!r} has its own weights")


def _module_rule(
    node: fx.Node, modules: dict[str, nn.Module], converted: frozenset[str]
) -> tuple[str, bool]:
    """(rule, pointwise) of a call_module node in the region; raises if it cannot be widened."""
    target = str(node.target)
    module = modules[target]
    if target in converted:
        return RULE_MCN, False
    if isinstance(module, _composite_types()):
        for name, child in module.named_modules():
            full = f"{target}.{name}"
            if name and not (
                full in converted
                or type(child) is nn.Conv2d
                or isinstance(child, _POINTWISE_MODULES)
                or _parameterless(child)
            ):
                raise _unwidenable(node, modules, f"its submodule {name!r} cannot be widened")
        return RULE_COMPOSITE, False
    if type(module) is nn.Conv2d:
        return RULE_CONV, False
    if isinstance(module, nn.Conv2d):
        raise _unwidenable(
            node, modules, f"{type(module).__name__} has its own forward, only nn.Conv2d widens"
        )
    if isinstance(module, _BatchNorm | nn.GroupNorm):
        _check_norm_children(node, module, modules)
        return RULE_NORM, True
    if isinstance(module, nn.PReLU):
        return (RULE_NORM if module.num_parameters > 1 else RULE_SAME), True
    if isinstance(module, _POINTWISE_MODULES + _timm_pointwise()):
        return RULE_SAME, True
    if isinstance(module, _SPATIAL_MODULES):
        return RULE_SAME, False
    raise _unwidenable(node, modules, "no widening rule for this module type")


def _node_rule(
    node: fx.Node, modules: dict[str, nn.Module], converted: frozenset[str]
) -> tuple[str, bool]:
    """(rule, pointwise) of a node in the region; raises `ConversionError` naming the node."""
    if node.op == "call_module":
        return _module_rule(node, modules, converted)
    if node.op == "call_function":
        if node.target in _POINTWISE_FUNCTIONS:
            return RULE_SAME, True
        if node.target in _SPATIAL_FUNCTIONS:
            return RULE_SAME, False
        if node.target is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            if isinstance(pad, list | tuple) and len(pad) <= 4:
                return RULE_SAME, False
            raise _unwidenable(node, modules, "padding of the channel dimension")
        if node.target is torch.cat:
            return RULE_SAME, False
        if node.target in (torch.mean, torch.sum, torch.amax, torch.amin):
            dims = _reduce_dims(node)
            if dims is not None and not set(dims) & set(_CHANNEL_DIMS):
                return RULE_SAME, False
            raise _unwidenable(node, modules, "it reduces over channels")
        raise _unwidenable(node, modules, "no widening rule for this function")
    if node.op == "call_method":
        method = str(node.target)
        if method in _POINTWISE_METHODS:
            return RULE_SAME, True
        if method in _REDUCTIONS:
            dims = _reduce_dims(node)
            if dims is not None and not set(dims) & set(_CHANNEL_DIMS):
                return RULE_SAME, False
            raise _unwidenable(node, modules, "it reduces over channels")
        raise _unwidenable(node, modules, "no widening rule for this method")
    raise _unwidenable(node, modules, "no widening rule for this node")


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
            rules[node.name] = _node_rule(node, modules, converted)[0]
        elif (
            node in down
            and node.op in ("call_module", "call_function", "call_method")
            and any(i in region for i in node.all_input_nodes)
        ):
            try:
                rule, pointwise = _node_rule(node, modules, converted)
            except ConversionError:
                continue  # not widenable: the region ends before it
            if pointwise:
                region.add(node)
                rules[node.name] = rule
    calls: dict[str, set[bool]] = {}
    for node in nodes:
        if node.op == "call_module" and not _parameterless(modules[str(node.target)]):
            calls.setdefault(str(node.target), set()).add(node in region)
    for node in nodes:
        if node.op == "call_module" and len(calls.get(str(node.target), ())) > 1:
            raise _unwidenable(node, modules, "its weights are used inside and outside the region")
    entries: dict[str, str] = {}
    exits: dict[str, str] = {}
    for node in nodes:
        if node in region:
            for source in node.all_input_nodes:
                if source in region:
                    continue
                if source.op == "get_attr":
                    if not _is_scalar_attr(source, root):
                        raise _unwidenable(
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
def _levels(w: torch.Tensor, m: torch.Tensor, planes: int) -> torch.Tensor:
    """Nearest level of ``w / m`` among ``-K, -K+2, ..., K``."""
    count = torch.clamp(torch.round((w / m + planes) / 2), 0, planes)
    return 2 * count - planes


def _least_squares_scale(
    w: torch.Tensor, levels: torch.Tensor, dims: tuple[int, ...], fallback: torch.Tensor
) -> torch.Tensor:
    den = levels.pow(2).sum(dim=dims, keepdim=True)
    num = (w * levels).sum(dim=dims, keepdim=True)
    return torch.where(den > 0, num / den.clamp_min(1e-30), fallback)


def plane_factors(
    planes: int, kernel_size: tuple[int, int] = (1, 1), spread: float = PLANE_SPREAD
) -> torch.Tensor:
    """Multipliers of the K M-Filter planes at init, shape ``(K, kh, kw)``.

    At kernel position p plane j gets ``1 + spread * (((j + p) mod K) / (K - 1) - 1/2)``: the
    planes' factors are evenly spaced around 1 with mean exactly 1 at every position, and the
    order rotates with the position, so the planes differ in shape, not only in scale (a
    common scale per plane would be undone by the next BatchNorm in training mode).
    """
    kh, kw = kernel_size
    if planes == 1:
        return torch.ones(1, kh, kw, dtype=torch.float64)
    position = torch.arange(kh * kw).view(1, kh, kw)
    order = (torch.arange(planes).view(planes, 1, 1) + position) % planes
    return 1 + spread * (order.to(torch.float64) / (planes - 1) - 0.5)


def fit_expanded(
    w0: torch.Tensor,
    planes: int,
    mcn1: bool = False,
    iters: int = 10,
    spread: float = PLANE_SPREAD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent C and M-Filter of an expand-mode `MCConv2d` approximating ``w0``.

    ``w0`` is the float weight ``(out, in // groups, kh, kw)``; the result is C of shape
    ``(out, in // groups * K, kh, kw)`` and M of shape ``(K, kh, kw)`` (``(K, 1, 1)`` for
    MCNs-1). On K equal input planes, output plane j uses ``M[j] * S`` with ``S[h, c] =
    sum_k sign(C[h, c*K + k])``, a (K+1)-level quantization of W0: the level scale m and the
    levels are fitted by alternating closed-form steps (levels given m: nearest level; m given
    levels: least squares), ``iters`` steps from each of a few starting scales on at most
    16384 sampled rows ``(h, c)``, keeping the best; the final M is the least-squares optimum
    on all of W0. Plane k of map c is
    +1 where W0 / m exceeds a threshold whose rank rotates with ``h + c``, so every level
    is reached with varied sign patterns; C keeps W0's ordering (its distance to the threshold)
    and is rescaled per input plane so that ``mean |C| = M``, the filter-loss minimiser
    (DESIGN.md section 2). M is the least-squares optimum for the signs, times
    `plane_factors` so that the K planes are never copies of one another.
    """
    compute = torch.float64 if w0.dtype == torch.float64 else torch.float32
    w = w0.detach().to(compute)
    out, cin, kh, kw = w.shape
    dims = (0, 1, 2, 3) if mcn1 else (0, 1)
    tiny = torch.finfo(compute).tiny
    # The scale depends only on the distribution of W0: search it on a strided sample of rows.
    rows = w.reshape(out * cin, 1, kh, kw)
    sample = rows[:: max(1, math.ceil(rows.shape[0] / _FIT_SAMPLE_ROWS))]
    rms = sample.pow(2).mean(dim=dims, keepdim=True).sqrt()
    best: tuple[float, torch.Tensor] | None = None
    for factor in _SCALE_CANDIDATES:
        m = (factor * rms / planes).clamp_min(tiny)
        for _ in range(iters):
            m = _least_squares_scale(sample, _levels(sample, m, planes), dims, m).clamp_min(tiny)
        err = float((sample - m * _levels(sample, m, planes)).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, m)
    assert best is not None
    m = best[1]
    # Thresholds: plane k of (h, c) is +1 iff (W0/m + K)/2 > rank + 1/2; ranks rotate with h + c.
    count = ((w / m + planes) / 2).unsqueeze(2)  # (out, cin, 1, kh, kw)
    offset = torch.arange(out).view(out, 1) + torch.arange(cin).view(1, cin)
    rank = (offset.view(out, cin, 1) + torch.arange(planes).view(1, 1, planes)) % planes
    raw = count - (rank.to(compute) + 0.5).view(out, cin, planes, 1, 1)  # (out, cin, K, kh, kw)
    signs = hard_sign(raw)
    levels = signs.sum(dim=2)
    m = _least_squares_scale(w, levels, dims, m).abs()
    factors = plane_factors(planes, (m.shape[2], m.shape[3]), spread).to(compute)
    mfilter = m.reshape(1, m.shape[2], m.shape[3]) * factors
    plane_dims = (0, 1, 3, 4) if mcn1 else (0, 1)
    scale_den = raw.abs().mean(dim=plane_dims, keepdim=True)
    target = mfilter.unsqueeze(0).unsqueeze(0)  # (1, 1, K, kh|1, kw|1)
    latent = torch.where(
        scale_den > 0, raw * (target / scale_den.clamp_min(tiny)), signs * target
    ).reshape(out, cin * planes, kh, kw)
    return latent.to(w0.dtype), mfilter.to(w0.dtype)


def expanded_error(w0: torch.Tensor, q: torch.Tensor, planes: int) -> float:
    """``sqrt(mean_j ||W0 - W_j||^2) / ||W0||``: the widened filters Q on K equal input planes.

    ``W_j[h, c] = sum_k Q[h*K + j, c*K + k]`` is what output plane j applies to map c when its
    K input planes are equal (the replicated input): the expand-mode counterpart of the
    per-layer ``||W0 - Q|| / ||W0||`` of width keep (DESIGN.md section 2).
    """
    out, cin, kh, kw = w0.shape
    w = w0.detach()
    norm = torch.linalg.vector_norm(w, dtype=torch.float64)
    if norm == 0:
        return 0.0
    per_plane = q.detach().to(w.dtype).reshape(out, planes, cin, planes, kh, kw).sum(dim=3)
    diff = torch.linalg.vector_norm(per_plane - w.unsqueeze(1), dtype=torch.float64)
    return float(diff / math.sqrt(planes) / norm)


# --- widening modules -----------------------------------------------------------------------
def widen_conv(conv: nn.Conv2d, planes: int) -> nn.Conv2d:
    """A float conv on K-times wider tensors that computes ``conv`` on K equal planes.

    Depthwise convs (one input and one output channel per group) become depthwise over every
    plane (``groups * K``, weights repeated); other convs keep their groups and spread each
    filter as ``W0 / K`` over the K input planes of a map, repeated for every output plane.
    """
    per_in = conv.in_channels // conv.groups
    per_out = conv.out_channels // conv.groups
    depthwise = per_in == 1 and per_out == 1
    w0 = conv.weight.detach()
    wide = nn.Conv2d(
        conv.in_channels * planes,
        conv.out_channels * planes,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups * planes if depthwise else conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=w0.device,
        dtype=w0.dtype,
    )
    with torch.no_grad():
        weight = w0.repeat_interleave(planes, dim=0)
        if not depthwise:
            weight = weight.repeat_interleave(planes, dim=1) / planes
        wide.weight.copy_(weight)
        if conv.bias is not None and wide.bias is not None:
            wide.bias.copy_(conv.bias.detach().repeat_interleave(planes))
    wide.weight.requires_grad_(conv.weight.requires_grad)
    wide.train(conv.training)
    return wide


def widen_mcconv(
    conv: nn.Conv2d, config: MCNConfig, initialize: bool = True, spread: float = PLANE_SPREAD
) -> MCConv2d:
    """``MCConv2d(in*K, out*K)`` for a converted conv: one binary filter per original filter.

    With ``initialize`` the latent C and M come from `fit_expanded`; the bias is repeated over
    the K planes of every output map.
    """
    k = config.planes
    w0 = conv.weight.detach()
    mc = MCConv2d.like_conv2d(conv, planes=k, mcn1=config.mcn1, clip=config.clip, widen=k)
    if initialize:
        latent, mfilter = fit_expanded(w0, k, config.mcn1, config.init_iters, spread)
        with torch.no_grad():
            mc.weight.copy_(latent)
            mc.mfilter.copy_(mfilter)
            if conv.bias is not None and mc.bias is not None:
                mc.bias.copy_(conv.bias.detach().repeat_interleave(k))
    mc.weight.requires_grad_(conv.weight.requires_grad)
    mc.train(conv.training)
    return mc


def widen_norm_(module: nn.Module, planes: int) -> None:
    """Widen a BatchNorm / GroupNorm / PReLU in place: per-channel tensors repeated K times."""
    if isinstance(module, _BatchNorm):
        channels = module.num_features
        module.num_features = channels * planes
    elif isinstance(module, nn.GroupNorm):
        channels = module.num_channels
        module.num_channels = channels * planes
    elif isinstance(module, nn.PReLU):
        channels = module.num_parameters
        module.num_parameters = channels * planes
    else:  # pragma: no cover - guarded by the plan
        raise TypeError(f"cannot widen {type(module).__name__}")
    with torch.no_grad():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 1 and param.shape[0] == channels:
                wide = nn.Parameter(
                    param.repeat_interleave(planes), requires_grad=param.requires_grad
                )
                setattr(module, name, wide)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.dim() == 1 and buf.shape[0] == channels:
                setattr(module, name, buf.repeat_interleave(planes))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


# --- the pass -------------------------------------------------------------------------------
def _decisions(
    model: nn.Module, config: MCNConfig, layers: Sequence[str] | None
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
        return plan_conversion(model, policy, info)
    modules = dict(model.named_modules())
    wanted = list(layers)
    missing = [n for n in wanted if not isinstance(modules.get(n), nn.Conv2d)]
    if missing:
        raise ConversionError(f"model has no Conv2d named {', '.join(missing[:5])}")
    chosen = set(wanted)
    return [
        LayerDecision(n, n in chosen, "" if n in chosen else "float in the checkpoint")
        for n in info.conv_order
    ]


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
    calibration: Iterable[object] | None = None,
    calibration_batches: int | None = None,
    layers: Sequence[str] | None = None,
    initialize: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    binarize: bool = True,
    spread: float = PLANE_SPREAD,
) -> fx.GraphModule:
    """The ``width: expand`` conversion of ``model`` (not mutated); see the module docstring.

    Arguments as `mcn_compress.convert.convert`; ``binarize=False`` widens the converted convs
    as float convs instead (`widen_conv`): the widened float network, which equals ``model``
    on every input, for testing the widening rules. ``spread`` is the relative spread of the K
    M-Filter planes at init (`plane_factors`).

    Example:
        >>> import timm
        >>> wide = expand_model(timm.create_model("resnet18"), MCNConfig(width="expand", planes=2))
        >>> wide(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    k = config.planes
    decisions = _decisions(model, config, layers)
    to_convert = [d.name for d in decisions if d.convert]
    if not to_convert:
        raise ConversionError(
            f"nothing to convert in {type(model).__name__}: no conv passes the policy; "
            "check --only/--keep"
        )
    originals = dict(model.named_modules())
    work = copy.deepcopy(model)
    try:
        gm = trace(work, MCNTracer(extra_leaves=_extra_leaves()))
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
        _set_submodule(gm, name, converted[name])
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
            _set_submodule(gm, target, widened_float[target])
        elif rule == RULE_NORM and target not in norms_done:
            widen_norm_(modules[target], k)
            norms_done.add(target)
        elif rule == RULE_COMPOSITE:
            for sub, child in list(modules[target].named_modules()):
                full = f"{target}.{sub}"
                if sub and full not in converted and full not in widened_float:
                    if type(child) is nn.Conv2d:
                        widened_float[full] = widen_conv(child, k)
                        _set_submodule(gm, full, widened_float[full])
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
    if calibration is not None:
        from mcn_compress.calibrate import recalibrate_batchnorm

        recalibrate_batchnorm(gm, calibration, max_batches=calibration_batches)
    for attr in COPIED_ATTRIBUTES:
        if hasattr(model, attr):
            setattr(gm, attr, copy.deepcopy(getattr(model, attr)))
    gm.train(model.training)
    gm.mcn_config = config  # type: ignore[assignment]
    gm.mcn_summary = summary  # type: ignore[assignment]
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
