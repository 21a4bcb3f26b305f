"""Small facts about, and edits of, `nn.Module` trees shared by the passes, formats and reports."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mcn_compress.errors import ConfigError
from mcn_compress.nn.mcconv import MCConv2d

DEFAULT_SIZE = 224


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def resolve_input_shape(
    model: nn.Module, input_size: int | Sequence[int] | None = None
) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input: ``input_size`` as S, (H, W) or (C, H, W), else the model's.

    Channels default to the first conv's ``in_channels``; height and width to timm's
    ``pretrained_cfg["input_size"]``, else 224.
    """
    channels = next(
        (m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d | MCConv2d)), 3
    )
    cfg = getattr(model, "pretrained_cfg", None)
    default_hw: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE)
    if isinstance(cfg, dict) and len(cfg.get("input_size") or ()) == 3:
        default_hw = (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
    if input_size is None:
        shape = (channels, *default_hw)
    else:
        sizes = [input_size] if isinstance(input_size, int) else list(input_size)
        if len(sizes) == 1:
            shape = (channels, sizes[0], sizes[0])
        elif len(sizes) == 2:
            shape = (channels, sizes[0], sizes[1])
        elif len(sizes) == 3:
            shape = (sizes[0], sizes[1], sizes[2])
        else:
            raise ConfigError(f"input size must be S, H,W or C,H,W; got {input_size!r}")
    if any(not isinstance(s, int) or s < 1 for s in shape):
        raise ConfigError(f"input size must be positive integers, got {input_size!r}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def default_input_shape(model: nn.Module, input_size: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of one input image: the stem's channels, timm's
    ``pretrained_cfg['input_size']`` or 224 unless ``input_size`` is given."""
    channels = 3
    for module in model.modules():
        if isinstance(module, nn.Conv2d | MCConv2d):
            channels = module.in_channels
            break
    if input_size is not None:
        return channels, input_size, input_size
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, list | tuple) and len(size) == 3:
        return channels, int(size[1]), int(size[2])
    return channels, 224, 224


def conv_bits(model: torch.nn.Module) -> int:
    """Bits of every conv weight of ``model``: 1 per sign and 32 per M value of an `MCConv2d`,
    32 per weight of a float conv (docs/design.md section 6)."""
    from mcn_compress.nn.mcconv import MCConv2d

    bits = 0
    for module in model.modules():
        if isinstance(module, MCConv2d):
            bits += module.weight.numel() + 32 * module.mfilter.numel()
        elif isinstance(module, torch.nn.Conv2d):
            bits += 32 * module.weight.numel()
    return bits
