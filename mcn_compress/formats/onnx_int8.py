"""ONNX float layers at 16 or 8 bits (docs/design.md section 4.9): a post-pass on the exported
``ModelProto`` that stores the weights of the layers that stay float (stem, classifier,
depthwise and other float convs) as float16 or per-output-channel int8, with standard operators
only::

    int8:    W.int8 (int8), W.scale (float32, one per output channel), W.zero_point (int8 0)
                 --DequantizeLinear(axis = output channel)--> W --> Conv / Gemm / MatMul
    float16: W.float16 --Cast(to=FLOAT)--> W --> Conv / Gemm / MatMul

``W' = q * scale_o`` with ``scale_o = max |W_o| / 127`` (`mcn_compress.formats.quantize`).
The rebuilt tensor keeps the initializer's name, so every consumer reads it unchanged; all its
inputs are initializers, so onnxruntime computes it when the session is created. Per-axis
``DequantizeLinear`` needs opset 13 (`MIN_INT8_OPSET`). Activations stay float32.

Which initializers: those equal (as values, not names: the exporter may rename or transpose
them) to the weight of a float layer of the exported PyTorch model, in its own layout
``(out, in, ...)`` or, for a 2-D weight, transposed ``(in, out)``. The converted layers' sign
bits (uint8), M-Filters and BatchNorm scales are never touched. The output-channel axis comes
from the consumer: input 1 of ``Conv`` (axis 0), ``Gemm`` (0 with ``transB=1``, else 1),
``MatMul`` (1, the weight being ``(in, out)``); other consumers take it from the layout match.
Numbers and graphs only: nothing here prints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mcn_compress.errors import ConfigError
from mcn_compress.formats.onnx_packing import splice_weights
from mcn_compress.formats.quantize import (
    DEFAULT_FLOAT_LAYERS,
    check_float_layers,
    float_layer_modules,
    quantize_int8,
)

_logger = logging.getLogger(__name__)

MIN_INT8_OPSET = 13  # per-axis DequantizeLinear
METADATA_KEY = "mcn_compress.float_layers"


def check_onnx_float_layers(float_layers: str, opset: int) -> None:
    """One-line `ConfigError` for an unknown mode, or int8 below `MIN_INT8_OPSET`."""
    check_float_layers(float_layers)
    if float_layers == "int8" and opset < MIN_INT8_OPSET:
        raise ConfigError(
            f"float layers int8 need opset {MIN_INT8_OPSET} or later (per-channel "
            f"DequantizeLinear), got opset {opset}"
        )


def float_layer_weights(exported: nn.Module, original: nn.Module) -> list[np.ndarray]:
    """The float32 weights, as the exporter sees them in ``exported`` (the copy that is
    exported, BatchNorm folded, converted layers as plain convs), of the layers that are float
    layers of ``original`` (`quantize.float_layer_modules`; design.md 4.9)."""
    modules = dict(exported.named_modules())
    return [
        modules[name].weight.detach().cpu().to(torch.float32).numpy()
        for name in float_layer_modules(original)
        if isinstance(getattr(modules.get(name), "weight", None), torch.Tensor)
    ]


def _op_axis(node: Any, index: int, ndim: int) -> int | None:
    """Output-channel axis of the weight read as input ``index`` of ``node``; None if unknown."""
    if index != 1:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm" and ndim == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and ndim == 2:
        return 1
    return None


def _layout_axis(
    array: np.ndarray, weights: dict[tuple[int, ...], list[tuple[int, np.ndarray]]]
) -> tuple[int, int] | None:
    """(0, i) if ``array`` equals float layer weight i, (1, i) if it equals a 2-D one
    transposed; None if it is no float layer weight."""
    for i, weight in weights.get(array.shape, []):
        if np.array_equal(array, weight):
            return 0, i
    if array.ndim == 2:
        for i, weight in weights.get(array.shape[::-1], []):
            if np.array_equal(array, weight.T):
                return 1, i
    return None


def _fresh(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}.{n}", n + 1
    taken.add(candidate)
    return candidate


def store_float_layers(
    proto: Any, float_layers: str, weights: Sequence[np.ndarray], opset: int
) -> list[str]:
    """Rewrite ``proto`` in place so that its float layer weights are stored as
    ``float_layers`` (see the module docstring); returns the rewritten initializer names.

    ``weights``: the float layer weights of the exported model (`float_layer_weights`). A
    weight not found in the graph is logged and left as it is.
    """
    from onnx import TensorProto, helper, numpy_helper

    check_onnx_float_layers(float_layers, opset)
    if float_layers == DEFAULT_FLOAT_LAYERS or not weights:
        return []
    graph = proto.graph
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, weight in enumerate(weights):
        by_shape.setdefault(tuple(weight.shape), []).append((i, weight))
    shapes = set(by_shape) | {s[::-1] for s in by_shape if len(s) == 2}
    uses: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, index))
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    added, nodes, rewritten = [], [], []
    found: set[int] = set()
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or tuple(init.dims) not in shapes:
            continue
        array = numpy_helper.to_array(init)
        match = _layout_axis(array, by_shape)
        if match is None or not uses.get(init.name):
            continue
        layout, hit = match
        found.update(i for i, w in enumerate(weights) if np.array_equal(w, weights[hit]))
        op_axes = {_op_axis(node, index, array.ndim) for node, index in uses[init.name]}
        axis = op_axes.pop() if len(op_axes) == 1 and None not in op_axes else layout
        rewritten.append(init.name)
        if float_layers == "int8":
            q, scale = quantize_int8(torch.from_numpy(array.copy()), axis)
            inputs = [
                _fresh(f"{init.name}.int8", taken),
                _fresh(f"{init.name}.scale", taken),
                _fresh(f"{init.name}.zero_point", taken),
            ]
            values = [q.numpy(), scale.numpy(), np.zeros(len(scale), dtype=np.int8)]
            added += [numpy_helper.from_array(v, n) for v, n in zip(values, inputs, strict=True)]
            nodes.append(
                helper.make_node(
                    "DequantizeLinear", inputs, [init.name], f"{init.name}/Dequant", axis=axis
                )
            )
        else:
            half = _fresh(f"{init.name}.float16", taken)
            added.append(numpy_helper.from_array(array.astype(np.float16), half))
            nodes.append(
                helper.make_node(
                    "Cast", [half], [init.name], f"{init.name}/Cast", to=TensorProto.FLOAT
                )
            )
    if len(found) < len(weights):
        _logger.warning(
            "%d of %d float layer weights not found as ONNX initializers: left float32",
            len(weights) - len(found),
            len(weights),
        )
    splice_weights(graph, set(rewritten), added, nodes)
    _logger.info("stored %d float layer weights as %s", len(rewritten), float_layers)
    return rewritten


__all__ = [
    "METADATA_KEY",
    "MIN_INT8_OPSET",
    "check_onnx_float_layers",
    "float_layer_weights",
    "store_float_layers",
]
