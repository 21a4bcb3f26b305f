"""Fold eval-mode BatchNorm into the plain conv it follows (used before ONNX export)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from mcn_compress.module_utils import set_submodule

_logger = logging.getLogger(__name__)


def _foldable_bn(module: nn.Module) -> nn.Module | None:
    """What replaces ``module`` once folded (Identity, or timm's drop+act), or None."""
    if not isinstance(module, nn.BatchNorm2d) or module.training:
        return None
    if not module.track_running_stats or module.running_mean is None:
        return None
    if type(module) is nn.BatchNorm2d:
        return nn.Identity()
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a runtime dependency
        return None
    if type(module) is BatchNormAct2d:
        return nn.Sequential(module.drop, module.act)
    return None


def folding_factors(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of an eval BatchNorm: ``bn(y) = y * s + t`` per channel, with
    ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s`` (docs/design.md section 4.4)."""
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None
    assert bn.running_mean is not None
    with torch.no_grad():
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
        scale = gamma / torch.sqrt(bn.running_var + bn.eps)
        return scale.detach().clone(), (beta - bn.running_mean * scale).detach().clone()


def conv_batchnorm_pairs(
    model: nn.Module, conv_type: type[nn.Module] = nn.Conv2d
) -> dict[str, tuple[str, nn.Module]]:
    """``{conv name: (bn name, what replaces the BN)}`` for each module of exactly
    ``conv_type`` whose output only a foldable eval BatchNorm consumes (each called once).

    Needs torch.fx tracing (`mcn_compress.passes.tracing`); an untraceable model gives ``{}``.
    """
    from torch import fx

    from mcn_compress.passes.tracing import trace

    try:
        gm = trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "do not fold"
        _logger.info("BatchNorm not folded: torch.fx cannot trace the model (%s)", exc)
        return {}
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs: dict[str, tuple[str, nn.Module]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules.get(str(node.target))) is not conv_type:
            continue
        users: list[fx.Node] = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args != (node,):
            continue
        conv_name, bn_name = str(node.target), str(users[0].target)
        replacement = _foldable_bn(modules[bn_name])
        if replacement is None or users[0].kwargs or calls[conv_name] != 1 or calls[bn_name] != 1:
            continue
        pairs[conv_name] = (bn_name, replacement)
    return pairs


def fold_batchnorms(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Fold, in place, each eval BatchNorm that alone consumes a plain ``nn.Conv2d`` output.

    Returns ``{conv name: (bn name, per-channel scale s)}``. The conv's weight becomes
    ``W * s`` and its bias ``(b - mean) * s + beta``; the BatchNorm is replaced by Identity
    (or by its drop and activation for timm's ``BatchNormAct2d``). Needs torch.fx tracing
    (`mcn_compress.passes.tracing`); an untraceable model is left unchanged (docs/design.md
    section 4).
    """
    modules = dict(model.named_modules())
    folded: dict[str, tuple[str, torch.Tensor]] = {}
    for conv_name, (bn_name, replacement) in conv_batchnorm_pairs(model, nn.Conv2d).items():
        conv, bn = modules[conv_name], modules[bn_name]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        with torch.no_grad():
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            new_bias = (bias - bn.running_mean) * scale + beta
            conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(new_bias, requires_grad=False)
        set_submodule(model, bn_name, replacement)
        folded[conv_name] = (bn_name, scale.detach().clone())
    return folded
