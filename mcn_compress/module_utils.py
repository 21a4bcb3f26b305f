"""Small facts about, and edits of, `nn.Module` trees shared by the passes, formats and reports."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mcn_compress.errors import ConfigError
from mcn_compress.nn.mcconv import MCConv2d

DEFAULT_SIZE = 224


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``root`` by ``module``."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


@contextmanager
def kept_train_flags(*models: nn.Module) -> Iterator[None]:
    """Restore the train/eval flag of every submodule of ``models`` on leaving the block."""
    flags = {m: m.training for model in models for m in model.modules()}
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.train(flag)


def in_channels(model: nn.Module) -> int:
    """Input channels of ``model``: its first conv's, else timm's ``input_size``, else 3."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d | MCConv2d)), None)
    if first is not None:
        return int(first.in_channels)
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[0]) if isinstance(size, list | tuple) and len(size) == 3 else 3


def resolve_input_shape(
    model: nn.Module, input_size: int | Sequence[int] | None = None
) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input: ``input_size`` as S, (H, W) or (C, H, W), else the model's.

    Channels default to `in_channels`; height and width to timm's
    ``pretrained_cfg["input_size"]``, else 224.
    """
    channels = in_channels(model)
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


def conv_bits(model: torch.nn.Module) -> int:
    """Bits of every conv weight of ``model``: 1 per sign and 32 per M value of an `MCConv2d`,
    32 per weight of a float conv (docs/design.md section 6)."""
    bits = 0
    for module in model.modules():
        if isinstance(module, MCConv2d):
            bits += module.weight.numel() + 32 * module.mfilter.numel()
        elif isinstance(module, torch.nn.Conv2d):
            bits += 32 * module.weight.numel()
    return bits


def input_sizes(
    model: nn.Module, example: torch.Tensor, names: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Input height and width of the named modules of ``model`` on ``example`` (one no-grad
    forward with pre-hooks; a module called twice keeps its first size)."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for name in names:

        def hook(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            sizes.setdefault(name, (int(args[0].shape[-2]), int(args[0].shape[-1])))

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return sizes
