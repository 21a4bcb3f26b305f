"""The theoretical minimum size of a packed model and the bound a real file must meet
(docs/design.md section 6, "Theoretical minimum"; section 4.9 for the float layers)::

    ceil(sign bits / 8) + sum(stored float values * bytes of their stored dtype)
        + bytes of integer and bool buffers

where the float layers' weights (`mcn_compress.formats.quantize`) count 4 or 2 bytes per value
(float32, float16), or 1 byte per value plus a float32 scale per output channel (int8). A file
is within bound when it is at most ``1.01 * minimum + 16 KiB``. Numbers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from mcn_compress.formats.quantize import (
    DEFAULT_FLOAT_LAYERS,
    check_float_layers,
    float_layer_weight_keys,
    stored_weight_bytes,
)
from mcn_compress.nn.mcconv import MCConv2d

BOUND_FRACTION = 0.01
BOUND_SLACK = 16 * 1024


def size_bound(min_bytes: int) -> int:
    """Largest acceptable file size for a theoretical minimum: 1% + 16 KiB over it."""
    return math.floor(min_bytes * (1 + BOUND_FRACTION)) + BOUND_SLACK


@dataclass(frozen=True)
class StorageCounts:
    """Stored values of a model's state dict and its theoretical minimum in bytes."""

    binary_params: int
    float_params: int
    float_buffers: int
    min_bytes: int


def _sign_keys(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, MCConv2d)}


def storage_counts(
    model: nn.Module,
    bytes_per_float: int | None = None,
    float_layers: str = DEFAULT_FLOAT_LAYERS,
) -> StorageCounts:
    """Count the stored values of ``model``'s state dict and its theoretical minimum in bytes.

    Sign bits are the latent weights of every `MCConv2d`; every other floating entry is a float
    parameter or buffer of ``bytes_per_float`` bytes (default: its dtype's size), except the
    float layers' weights with ``float_layers`` ``"float16"`` or ``"int8"`` (design.md 4.9,
    `formats.quantize.stored_weight_bytes`); integer and bool buffers count their own bytes.
    """
    check_float_layers(float_layers)
    signs = _sign_keys(model)
    layer_keys = float_layer_weight_keys(model) if float_layers != DEFAULT_FLOAT_LAYERS else set()
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    bits = float_params = float_buffers = float_bytes = other_bytes = 0
    for key, value in model.state_dict().items():
        if key in signs:
            bits += value.numel()
        elif value.is_floating_point():
            if key in params:
                float_params += value.numel()
            else:
                float_buffers += value.numel()
            if key in layer_keys:
                float_bytes += stored_weight_bytes(value.shape, float_layers)
            else:
                float_bytes += value.numel() * (bytes_per_float or value.element_size())
        else:
            other_bytes += value.numel() * value.element_size()
    return StorageCounts(
        bits, float_params, float_buffers, math.ceil(bits / 8) + float_bytes + other_bytes
    )
