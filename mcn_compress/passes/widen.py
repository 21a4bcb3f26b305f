"""Widening rules of ``width: expand``: which op keeps its meaning on K-times wider tensors,
and how converted convs, float convs and per-channel modules are widened."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mcn_compress.config import MCNConfig
from mcn_compress.errors import ConversionError
from mcn_compress.nn.expand_init import PLANE_SPREAD, fit_expanded
from mcn_compress.nn.mcconv import MCConv2d

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


def extra_leaves() -> tuple[type[nn.Module], ...]:
    """BatchNorm subclasses (timm's BatchNormAct2d, ...) and timm DropPath stay leaves."""
    leaves: list[type[nn.Module]] = [_BatchNorm]
    try:
        from timm.layers import DropPath

        leaves.append(DropPath)
    except ImportError:  # pragma: no cover - timm is a runtime dependency
        pass
    return tuple(leaves)


#: ``rule(node, module, modules, converted) -> (rule name, pointwise)``, or raises
#: `unwidenable`; ``converted`` holds the names of the convs that become MCConv2d
ModuleRule = Callable[[fx.Node, nn.Module, dict[str, nn.Module], frozenset[str]], tuple[str, bool]]

MODULE_RULES: dict[type[nn.Module], ModuleRule] = {}
"""Widening rule of each module type, looked up along the module's MRO (most specific type
first): add one with `register_module_rule`."""


def register_module_rule(
    module_type: type[nn.Module], rule: str | ModuleRule, pointwise: bool = False
) -> None:
    """Tell width expand how to treat ``module_type`` (and its subclasses) inside the region.

    ``rule`` is `RULE_SAME` (the module acts per element or per channel plane-wise and needs
    no change, e.g. an activation; ``pointwise`` lets the region extend through it) or
    `RULE_NORM` (its 1-D per-channel tensors are repeated K times), or a function
    ``(node, module, modules, converted) -> (rule, pointwise)`` that decides per module.

    Example:
        >>> register_module_rule(MySwish, RULE_SAME, pointwise=True)
    """
    if callable(rule):
        MODULE_RULES[module_type] = rule
    else:
        fixed = (rule, pointwise)
        MODULE_RULES[module_type] = lambda node, module, modules, converted: fixed


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


def unwidenable(node: fx.Node, modules: dict[str, nn.Module], why: str) -> ConversionError:
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


def parameterless(module: nn.Module) -> bool:
    return not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())


def _check_norm_children(node: fx.Node, module: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, child in module.named_children():
        if not parameterless(child):
            raise unwidenable(node, modules, f"its submodule {name!r} has its own weights")


def _conv_rule(
    node: fx.Node, module: nn.Module, modules: dict[str, nn.Module], _: frozenset[str]
) -> tuple[str, bool]:
    if type(module) is nn.Conv2d:
        return RULE_CONV, False
    raise unwidenable(
        node, modules, f"{type(module).__name__} has its own forward, only nn.Conv2d widens"
    )


def _norm_rule(
    node: fx.Node, module: nn.Module, modules: dict[str, nn.Module], _: frozenset[str]
) -> tuple[str, bool]:
    _check_norm_children(node, module, modules)
    return RULE_NORM, True


def _prelu_rule(
    node: fx.Node, module: nn.Module, modules: dict[str, nn.Module], _: frozenset[str]
) -> tuple[str, bool]:
    assert isinstance(module, nn.PReLU)
    return (RULE_NORM if module.num_parameters > 1 else RULE_SAME), True


def _composite_rule(
    node: fx.Node, module: nn.Module, modules: dict[str, nn.Module], converted: frozenset[str]
) -> tuple[str, bool]:
    """A leaf whose forward applies only per-channel ops around its own convs (timm ConvMlp):
    its convs and norms are widened one by one."""
    target = str(node.target)
    for name, child in module.named_modules():
        if name and not (
            f"{target}.{name}" in converted
            or type(child) is nn.Conv2d
            or isinstance(child, _POINTWISE_MODULES)
            or parameterless(child)
        ):
            raise unwidenable(node, modules, f"its submodule {name!r} cannot be widened")
    return RULE_COMPOSITE, False


def _register_defaults() -> None:
    register_module_rule(nn.Conv2d, _conv_rule)
    register_module_rule(_BatchNorm, _norm_rule)
    register_module_rule(nn.GroupNorm, _norm_rule)
    register_module_rule(nn.PReLU, _prelu_rule)
    for pointwise_type in _POINTWISE_MODULES:
        register_module_rule(pointwise_type, RULE_SAME, pointwise=True)
    for spatial_type in _SPATIAL_MODULES:
        register_module_rule(spatial_type, RULE_SAME)
    try:
        from timm.layers import DropPath
        from timm.models.vgg import ConvMlp
    except ImportError:  # pragma: no cover - timm is a runtime dependency
        return
    register_module_rule(DropPath, RULE_SAME, pointwise=True)
    register_module_rule(ConvMlp, _composite_rule)


_register_defaults()


def _module_rule(
    node: fx.Node, modules: dict[str, nn.Module], converted: frozenset[str]
) -> tuple[str, bool]:
    """(rule, pointwise) of a call_module node in the region; raises if it cannot be widened."""
    target = str(node.target)
    module = modules[target]
    if target in converted:
        return RULE_MCN, False
    for cls in type(module).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            return rule(node, module, modules, converted)
    raise unwidenable(node, modules, "no widening rule for this module type")


def node_rule(
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
            raise unwidenable(node, modules, "padding of the channel dimension")
        if node.target is torch.cat:
            return RULE_SAME, False
        if node.target in (torch.mean, torch.sum, torch.amax, torch.amin):
            dims = _reduce_dims(node)
            if dims is not None and not set(dims) & set(_CHANNEL_DIMS):
                return RULE_SAME, False
            raise unwidenable(node, modules, "it reduces over channels")
        raise unwidenable(node, modules, "no widening rule for this function")
    if node.op == "call_method":
        method = str(node.target)
        if method in _POINTWISE_METHODS:
            return RULE_SAME, True
        if method in _REDUCTIONS:
            dims = _reduce_dims(node)
            if dims is not None and not set(dims) & set(_CHANNEL_DIMS):
                return RULE_SAME, False
            raise unwidenable(node, modules, "it reduces over channels")
        raise unwidenable(node, modules, "no widening rule for this method")
    raise unwidenable(node, modules, "no widening rule for this node")


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
