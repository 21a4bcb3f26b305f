"""How the layers that stay float are stored (docs/design.md section 4.9, "Float layers at 8
bits"): float32 (as today), float16, or int8 with one float32 scale per output channel.

Per-output-channel symmetric int8 (design.md 4.9), for a weight W with output channel o on
``axis`` (0 for ``nn.Conv2d`` ``(out, in // groups, kh, kw)`` and ``nn.Linear`` ``(out, in)``)::

    scale_o = max |W_o| / 127            (scale_o = 1 where W_o is all zeros)
    q       = clamp(round(W / scale_o), -127, 127)      round half to even, int8
    W'      = q * scale_o                |W - W'| <= scale_o / 2 per element

The "float layer weights" are the ``weight`` of every ``nn.Conv1d/2d/3d`` and ``nn.Linear``
that is not an `MCConv2d`: the stem, the classifier, depthwise and other float convs. Their
biases, BatchNorm parameters and buffers, and the M-Filters stay float32 (or float16 with
``float16=True`` in the packed file). Activations are untouched: this is weight-only storage,
dequantized back to float32 when the file is loaded or the ONNX session is created.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mcn_compress.defaults import FLOAT_LAYER_MODES
from mcn_compress.errors import ConfigError, ExportError
from mcn_compress.nn.mcconv import MCConv2d

DEFAULT_FLOAT_LAYERS = "float32"
INT8_MAX = 127
SCALE_BYTES = 4  # int8 scales are float32
_FLOAT_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_float_layers(mode: str) -> str:
    """``mode`` if it is one of `FLOAT_LAYER_MODES`, else a one-line `ConfigError`."""
    if mode not in FLOAT_LAYER_MODES:
        raise ConfigError(
            f"float_layers must be one of {', '.join(FLOAT_LAYER_MODES)}, got {mode!r}"
        )
    return mode


def float_layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of the layers that stay float (design.md 4.9), in registration order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _FLOAT_LAYER_TYPES)
        and not isinstance(module, MCConv2d)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.is_floating_point()
    }


def float_layer_weight_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the float layer weights (``<layer>.weight``; design.md 4.9)."""
    return {f"{name}.weight" for name in float_layer_modules(model)}


def quantize_int8(weight: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8 of ``weight`` along ``axis`` (design.md 4.9).

    Returns ``(q, scale)``: int8 ``q`` of ``weight``'s shape and float32 ``scale`` of shape
    ``(weight.shape[axis],)``. Raises `ExportError` on non-finite weights.
    """
    w = weight.detach().cpu().to(torch.float32)
    if w.dim() == 0:
        raise ExportError("cannot quantize a scalar weight per channel")
    if not bool(torch.isfinite(w).all()):
        raise ExportError("cannot quantize a weight holding NaN or infinite values")
    moved = w.movedim(axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    peak = rows.abs().amax(dim=1) if rows.shape[1] else torch.zeros(rows.shape[0])
    scale = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak)).to(torch.float32)
    ratio = rows.double() / scale.double().unsqueeze(1)
    q = torch.round(ratio).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(moved.shape).movedim(0, axis).contiguous(), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``q * scale`` per channel along ``axis``, as float32 (the inverse of `quantize_int8`)."""
    if q.dtype != torch.int8 or scale.dim() != 1 or q.dim() == 0 or q.shape[axis] != len(scale):
        raise ValueError(
            f"{tuple(scale.shape)} scales do not fit int8 values of shape {tuple(q.shape)}"
        )
    view = [1] * q.dim()
    view[axis] = -1
    return q.to(torch.float32) * scale.to(torch.float32).reshape(view)


def stored_weight_bytes(shape: Sequence[int], mode: str, bytes_per_float: int = 4) -> int:
    """Bytes a float layer weight of ``shape`` takes when stored as ``mode`` (design.md 4.9):
    int8 is 1 byte per value plus a float32 scale per output channel (axis 0), float16 2 bytes
    per value, float32 ``bytes_per_float`` per value (4, or 2 with ``float16=True``)."""
    numel = math.prod(shape)
    if mode == "int8":
        return numel + SCALE_BYTES * (int(shape[0]) if len(shape) else 1)
    if mode == "float16":
        return 2 * numel
    return bytes_per_float * numel


__all__ = [
    "DEFAULT_FLOAT_LAYERS",
    "FLOAT_LAYER_MODES",
    "INT8_MAX",
    "check_float_layers",
    "dequantize_int8",
    "float_layer_modules",
    "float_layer_weight_keys",
    "quantize_int8",
    "stored_weight_bytes",
]
