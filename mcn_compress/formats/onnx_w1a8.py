"""ONNX with int8 activations and 1-bit weights (W1A8; docs/design.md section 4.10).

`w1a8_model` makes a QDQ ONNX model that stock onnxruntime and OpenVINO run with their int8
kernels, from an MCN model and unlabeled calibration images:

1. **Float graph in int8-friendly forms.** The model is exported as for the folded layout
   (`onnx_prepare`: Q per converted conv, BatchNorm folded). The planner
   (`passes.planner.int8_rule`, back end ``onnxruntime-int8``) picks each converted conv's form
   for the target threads, and the ``Conv`` node of each factored layer is replaced by
   standard operators whose weights are exact in int8:

   - ``scale`` (1x1 convs, MCNs-1): ``z = Conv(x, B)`` with the H = out / K binary filters
     (the layer's strides and pads), each map repeated K times in place
     (``Reshape(N, H, 1, L) -> Concat K x on axis 2 -> Reshape(N, out, Ho, Wo)``, so channel
     ``h*K + j`` holds ``z[h]``), then a depthwise 1x1 ``Conv`` (``group = out``) with weight
     ``A[h*K + j] = s_bn[h*K + j] * M[j]`` and the folded bias:
     ``y[h*K + j] = A[h*K + j] * z[h] + bias'``.
   - ``grid`` (full M, stride 1): ``z = Conv1x1(x, B_grid)`` with ``P*H`` outputs in
     position-major order (``B_grid[p*H + h, c] = B[h, c, p]``), zero-padded afterwards by the
     layer's pads (a 1x1 conv without bias commutes with zero padding), one ``Slice`` per
     kernel position ``p = (a, b)`` (``z_pad[p*H:(p+1)*H, a*d : a*d + Ho, b*d : b*d + Wo]``),
     ``Unsqueeze`` + ``Concat`` on axis 2 into map-major order ``(h, p)``, then a 1x1 ``Conv``
     with ``group = H`` (weight ``A[h*K + j, p] = s_bn[h*K + j] * M[j, p]``, the folded bias):
     ``y[h*K + j](o) = sum_p A[h*K + j, p] * z[h, p](o + p*d) + bias'`` (section 4.8).
   - ``dense``: the ``Conv`` with Q as exported.

2. **Quantization.** onnxruntime's ``quantize_static`` (QDQ format, per-channel symmetric
   int8 weights, asymmetric uint8 activations, MinMax ranges over the calibration images)
   quantizes every ``Conv``/``Gemm``/``MatMul`` (float layers included) and the tensors
   between them. Then (`avoid_saturation`) the ±1 filters of the factored forms are stored as
   ±1 with scale 1 and their combination weights with 7 bits: on x86 CPUs without VNNI,
   onnxruntime's u8 x s8 kernels add pairs of products in int16 with saturation, and a
   combination over ``P`` positions of a uint8 ``z`` with weights near ±127 overflowed
   (outputs 7% off instead of 1% on a test ResNet-18).

3. **Bits back.** Each converted layer's int8 weight is rebuilt from the packed sign bits:
   the quantizer's ``q = round(W / scale_o)`` of a weight ``W[o, c, p] = B[h(o), c, p] *
   V[o, p]`` (Q, or ``B`` in the factored forms) is ``q = B * T`` with an int8 table ``T[o, p]``
   (``out * kh*kw`` values) because rounding is odd-symmetric. The int8 initializer is replaced
   by the unpack subgraph of section 4.4, a ``Mul`` by ``T`` and ``QuantizeLinear`` (scale 1,
   zero point 0) that feeds the quantizer's ``DequantizeLinear``; ``q == B * T`` is checked on
   every element, and a layer where it fails keeps its int8 initializer (a log line).
   onnxruntime folds the subgraph once at session creation.

Numbers and graphs only: nothing here prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mcn_compress.defaults import ACTIVATIONS, DEFAULT_INT8_IMAGES
from mcn_compress.errors import ConfigError, DataError, ExportError, first_line
from mcn_compress.formats.onnx_factored import _attrs, node_geometry
from mcn_compress.formats.onnx_packing import (
    ConvSite,
    GraphBuilder,
    PackedLayer,
    inline_initializer_aliases,
    match_conv_weights,
    splice_weights,
)
from mcn_compress.formats.onnx_prepare import PreparedModel, prepare_for_onnx
from mcn_compress.formats.onnx_torch import torch_export
from mcn_compress.formats.packed import unpack_signs
from mcn_compress.module_utils import input_sizes
from mcn_compress.passes.calibrate import batch_input
from mcn_compress.passes.planner import (
    DEFAULT_TUNABLES,
    Backend,
    Compute,
    Form,
    InferencePlan,
    LayerPlan,
    Tunables,
    plan_layer,
)

_logger = logging.getLogger(__name__)

MIN_W1A8_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
DEFAULT_CALIBRATION_IMAGES = DEFAULT_INT8_IMAGES
QUANTIZED_SUFFIX = "_quantized"  # onnxruntime.quantization's name for a weight's int8 copy


@dataclasses.dataclass(frozen=True)
class W1A8Graph:
    """What `w1a8_model` made besides the graph: the plan, which layers are factored, which
    were rebuilt from their sign bits (the others keep an int8 initializer) and the images
    the activation ranges came from."""

    plan: InferencePlan
    bit_layers: tuple[str, ...]
    calibration_images: int


# --- step 1: the float graph in int8-friendly forms -----------------------------------------
class _FormEmitter:
    """Replaces one ``Conv`` node by its factored int8-friendly form (module docstring)."""

    def __init__(self, builder: GraphBuilder) -> None:
        self.b = builder

    def binary_weight(self, layer: PackedLayer, form: Form) -> np.ndarray:
        """The float ±1 filters of ``form``: ``(H, cin, kh, kw)`` (scale) or ``(P*H, cin,
        1, 1)`` in position-major order (grid)."""
        signs = _signs(layer).astype(np.float32)
        if form is Form.SCALE:
            return signs
        h, cin, kh, kw = signs.shape
        return signs.reshape(h, cin, kh * kw).transpose(2, 0, 1).reshape(kh * kw * h, cin, 1, 1)

    def combination(self, layer: PackedLayer, positions: int) -> np.ndarray:
        """``A[h*K + j, p] = s_bn[h*K + j] * M[j, p]`` as a ``(out, P, 1, 1)`` weight."""
        h = layer.latent_shape[0]
        k = layer.mfilter.shape[0]
        m = layer.mfilter.astype(np.float32).reshape(k, -1)
        if m.shape[1] != positions:
            m = np.repeat(m[:, :1], positions, axis=1)
        a = np.tile(m, (h, 1))  # row h*K + j is M[j]
        if layer.scale is not None:
            a = a * layer.scale.astype(np.float32).reshape(-1, 1)
        return a.reshape(h * k, positions, 1, 1).astype(np.float32)

    def emit(self, node: Any, plan: LayerPlan, layer: PackedLayer, binary_name: str) -> None:
        geo, name = plan.geometry, plan.name
        b = self.b
        x, output = node.input[0], node.output[0]
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        ho, wo = geo.output_hw
        h, k = geo.maps, geo.planes
        weight = b.tensor(binary_name, self.binary_weight(layer, plan.form))
        if plan.form is Form.SCALE:
            attrs = {key: value for key, value in _attrs(node).items() if key != "group"}
            z = b.node("Conv", [x, weight], f"{name}.w1a8.z", **attrs)
            column = b.node("Reshape", [z, b.shape([0, h, 1, ho * wo])], f"{name}.w1a8.column")
            repeated = b.node("Concat", [column] * k, f"{name}.w1a8.repeated", axis=2)
            maps = b.node("Reshape", [repeated, b.shape([0, h * k, ho, wo])], f"{name}.w1a8.maps")
            a = b.tensor(f"{name}.w1a8.combine", self.combination(layer, 1))
            b.node("Conv", [maps, a, *bias], output, group=h * k)
            return
        positions = geo.positions
        z = b.node("Conv", [x, weight], f"{name}.w1a8.z")
        top, bottom, left, right = geo.pads
        pads = b.constant(
            f"mcn.pads.{top}.{left}.{bottom}.{right}",
            np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64),
        )
        padded = b.node("Pad", [z, pads], f"{name}.w1a8.padded")
        axes = b.constant("mcn.axes.1.2.3", np.array([1, 2, 3], dtype=np.int64))
        unsqueeze = b.constant("mcn.axes.2", np.array([2], dtype=np.int64))
        windows = []
        dh, dw = geo.dilation
        for p in range(positions):
            a_, c_ = divmod(p, geo.kernel[1])
            start = [p * h, a_ * dh, c_ * dw]
            end = [(p + 1) * h, a_ * dh + ho, c_ * dw + wo]
            starts = b.constant(f"mcn.start.{'.'.join(map(str, start))}", np.array(start))
            ends = b.constant(f"mcn.end.{'.'.join(map(str, end))}", np.array(end))
            window = b.node("Slice", [padded, starts, ends, axes], f"{name}.w1a8.window{p}")
            windows.append(b.node("Unsqueeze", [window, unsqueeze], f"{name}.w1a8.stack{p}"))
        stacked = b.node("Concat", windows, f"{name}.w1a8.stacked", axis=2)
        maps = b.node(
            "Reshape", [stacked, b.shape([0, h * positions, ho, wo])], f"{name}.w1a8.maps"
        )
        a = b.tensor(f"{name}.w1a8.combine", self.combination(layer, positions))
        b.node("Conv", [maps, a, *bias], output, group=h)


def _signs(layer: PackedLayer) -> np.ndarray:
    """The layer's ±1 filters B, int8 ``(H, cin, kh, kw)``, from its packed bits."""
    packed = torch.from_numpy(np.ascontiguousarray(layer.signs))
    return unpack_signs(packed, layer.latent_shape, torch.int8).numpy()


def _binary_name(layer: PackedLayer) -> str:
    return _binary_name_of(layer.name)


def _binary_name_of(name: str) -> str:
    return f"{name}.w1a8.binary"


def plan_and_factor(
    proto: Any,
    sites: Sequence[ConvSite],
    input_hw: Mapping[str, tuple[int, int]],
    input_shape: tuple[int, ...],
    compute: Compute,
    threads: int,
    opset: int,
    tunables: Tunables = DEFAULT_TUNABLES,
    forms: Mapping[str, Form] | None = None,
) -> InferencePlan:
    """Plan every converted layer for onnxruntime int8 at ``threads`` and rewrite the ``Conv``
    node of each factored one in place (step 1 of the module docstring)."""
    graph = proto.graph
    builder = GraphBuilder(opset, [i.name for i in graph.initializer if i.name.startswith("mcn.")])
    emitter = _FormEmitter(builder)
    rows: list[LayerPlan] = []
    replaced: dict[int, list[Any]] = {}
    for site in sites:
        layer = site.layer
        if not site.weight or len(site.nodes) != 1:
            raise ExportError(
                f"cannot export layer {layer.name} with int8 activations: its weight does not "
                "reach exactly one ONNX Conv unchanged; export it with --activations float32"
            )
        node = site.nodes[0]
        geo = node_geometry(layer, node, input_hw[layer.name])
        row = plan_layer(
            layer.name,
            geo,
            compute,
            Backend.ONNXRUNTIME_INT8,
            threads,
            tunables=tunables,
            folded_batchnorm=layer.folded_batchnorm,
        )
        wanted = (forms or {}).get(layer.name)
        if wanted is not None:
            row = dataclasses.replace(row, form=wanted)
        if (
            row.form not in (Form.DENSE, Form.SCALE, Form.GRID)
            or (row.form is Form.GRID and (geo.stride != (1, 1) or geo.groups != 1))
            or (row.form is Form.SCALE and (geo.full_m or geo.groups != 1))
        ):
            raise ConfigError(
                f"layer {layer.name} cannot run int8 in form {row.form.value!r} "
                "(int8 forms: dense; scale for 1x1 or MCNs-1; grid for stride 1, groups 1)"
            )
        rows.append(row)
        if row.form is Form.DENSE:
            continue
        first = len(builder.nodes)
        emitter.emit(node, row, layer, _binary_name(layer))
        replaced[id(node)] = builder.nodes[first:]
        builder.nodes = builder.nodes[:first]
    nodes = []
    for node in graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(builder.initializers)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return InferencePlan(Backend.ONNXRUNTIME_INT8, compute, threads, input_shape, tuple(rows))


# --- step 2: quantize_static ----------------------------------------------------------------
class ImageReader:
    """Feeds ``quantize_static`` one image at a time (the graph's batch may be fixed at 1)."""

    def __init__(self, input_name: str, batches: Iterable[object], max_images: int) -> None:
        self.input_name = input_name
        self.images: list[np.ndarray] = []
        for batch in batches:
            x = batch_input(batch).detach().cpu().float()
            for image in x:
                if len(self.images) < max_images:
                    self.images.append(image.unsqueeze(0).numpy())
            if len(self.images) >= max_images:
                break
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        self._next += 1
        return {self.input_name: self.images[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs advice ("consider pre-processing") as root-logger
    warnings; keep them out of the user's output while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_qdq(proto: Any, reader: Any) -> Any:
    """``quantize_static`` of ``proto`` in QDQ format: per-channel symmetric int8 weights,
    uint8 activations, MinMax ranges from ``reader`` (an onnxruntime
    ``CalibrationDataReader``-like object). Returns the quantized ``ModelProto``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader.get_next()

    with tempfile.TemporaryDirectory(prefix="mcn-w1a8-") as tmp, _quiet_root_logger():
        source, target = Path(tmp, "float.onnx"), Path(tmp, "int8.onnx")
        onnx.save(proto, source)
        try:
            quantize_static(
                source,
                target,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        except Exception as exc:  # onnxruntime raises many types; one line for the user
            raise ExportError(
                f"onnxruntime could not quantize the model: {first_line(exc)}"
            ) from exc
        return onnx.load(target)


# --- step 3: the int8 weights from the sign bits --------------------------------------------
def _int8_table(q: np.ndarray, signs: np.ndarray) -> np.ndarray | None:
    """``T`` with ``q == signs * T[:, None, ...]`` (``T[o, p]`` shaped ``(out, 1, kh, kw)``),
    or None where no such table exists."""
    table = (q[:, :1] * signs[:, :1]).astype(np.int8)
    return table if np.array_equal(q, signs * table) else None


def _expanded_signs(layer: PackedLayer, form: Form) -> np.ndarray:
    """The ±1 int8 filters of ``form`` per output row of its int8 weight."""
    signs = _signs(layer)
    h, cin, kh, kw = signs.shape
    if form is Form.SCALE:
        return signs
    if form is Form.GRID:
        return signs.reshape(h, cin, kh * kw).transpose(2, 0, 1).reshape(kh * kw * h, cin, 1, 1)
    return np.repeat(signs, layer.mfilter.shape[0], axis=0)  # dense: row h*K + j reads B[h]


COMBINE_MAX = 63  # 7-bit combination weights: two u8 x s8 products fit int16 (see below)


def _dequantize_inputs(graph: Any) -> dict[str, Any]:
    """int8/int32 initializer name -> the ``DequantizeLinear`` node that reads it."""
    return {n.input[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}


def avoid_saturation(proto: Any, plan: InferencePlan) -> None:
    """Keep the factored layers' int8 sums exact on CPUs without VNNI (step 2 of the module
    docstring). There, onnxruntime's u8 x s8 kernels add two products into int16 with
    saturation (``vpmaddubsw``); a pair of 255 x 127 overflows. The ±1 filters are stored
    as ±1 with scale 1 (exact, no overflow), and the combination weights with 7 bits
    (``|q| <= 63``: ``2 * 255 * 63 < 2**15``), their int32 biases re-quantized to the new
    scale ``s_x * s_w``. Dense layers stay as ``quantize_static`` made them, as in int8 PTQ."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    readers = _dequantize_inputs(graph)

    def replace(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    for row in plan.layers:
        if row.form is Form.DENSE:
            continue
        binary = f"{_binary_name_of(row.name)}{QUANTIZED_SUFFIX}"
        combine = f"{row.name}.w1a8.combine{QUANTIZED_SUFFIX}"
        if binary not in inits or combine not in inits:
            raise ExportError(f"layer {row.name}: the quantizer did not quantize its form")
        q = numpy_helper.to_array(inits[binary])
        replace(binary, np.sign(q).astype(np.int8))
        scale_name = readers[binary].input[1]
        replace(scale_name, np.ones_like(numpy_helper.to_array(inits[scale_name])))
        w_scale_name = readers[combine].input[1]
        w_scale = numpy_helper.to_array(inits[w_scale_name]).astype(np.float64)
        weights = numpy_helper.to_array(inits[combine]).astype(np.float64)
        shape = (-1,) + (1,) * (weights.ndim - 1)
        real = weights * w_scale.reshape(shape)
        new_scale = np.abs(real).reshape(len(real), -1).max(axis=1) / COMBINE_MAX
        new_scale = np.where(new_scale > 0, new_scale, 1.0)
        replace(combine, np.round(real / new_scale.reshape(shape)).astype(np.int8))
        replace(w_scale_name, new_scale.astype(np.float32))
        conv = next(
            n
            for n in graph.node
            if (n.op_type == "Conv" and n.output[0] == row.name)
            or (n.op_type == "Conv" and readers[combine].output[0] in n.input)
        )
        if len(conv.input) < 3:
            continue
        bias_dq = next(n for n in graph.node if n.output and n.output[0] == conv.input[2])
        bias_name, bias_scale_name = bias_dq.input[0], bias_dq.input[1]
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
        old_bias_scale = numpy_helper.to_array(inits[bias_scale_name]).astype(np.float64)
        bias_scale = old_bias_scale / w_scale * new_scale  # s_x * s_w, with the new s_w
        replace(bias_name, np.round(bias * old_bias_scale / bias_scale).astype(np.int32))
        replace(bias_scale_name, bias_scale.astype(np.float32))


def restore_bits(
    proto: Any,
    plan: InferencePlan,
    layers: Sequence[PackedLayer],
    opset: int,
    dense_weights: Mapping[str, str],
) -> tuple[str, ...]:
    """Replace each converted layer's int8 weight initializer by its sign bits, an int8 table
    and the rebuilding subgraph (step 3 of the module docstring). Returns the layers rebuilt."""
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    builder = GraphBuilder(opset, [n for n in initializers if n.startswith("mcn.")])
    by_name = {layer.name: layer for layer in layers}
    replaced: set[str] = set()
    rebuilt: list[str] = []
    for row in plan.layers:
        layer = by_name[row.name]
        source = _binary_name(layer) if row.form is not Form.DENSE else dense_weights[row.name]
        target = source + QUANTIZED_SUFFIX
        if target in replaced:  # weights merged by the exporter: already rebuilt
            rebuilt.append(row.name)
            continue
        init = initializers.get(target)
        if init is None or init.data_type != TensorProto.INT8:
            _logger.warning("layer %s: no int8 weight %s to rebuild from bits", row.name, target)
            continue
        q = numpy_helper.to_array(init)
        signs = _expanded_signs(layer, row.form)
        table = _int8_table(q, signs) if q.shape == signs.shape else None
        if table is None:
            _logger.warning(
                "layer %s: its int8 weight is not signs x table; kept as int8", row.name
            )
            continue
        prefix = f"{row.name}.w1a8"
        sign = builder.signs_of(layer, prefix)  # (H, 1, cin, kh, kw) float ±1
        h, cin, kh, kw = layer.latent_shape
        if row.form is Form.GRID:
            flat = builder.node(
                "Reshape", [sign, builder.shape([h, cin, kh * kw])], f"{prefix}.hcp"
            )
            sign = builder.node("Transpose", [flat], f"{prefix}.phc", perm=[2, 0, 1])
            shaped = table.reshape(kh * kw, h, 1)
        elif row.form is Form.SCALE:
            shaped = table.reshape(h, 1, 1, kh, kw)
        else:
            k = layer.mfilter.shape[0]
            shaped = table.reshape(h, k, 1, kh, kw)
        values = builder.tensor(f"{prefix}.table", shaped.astype(np.float32))
        scaled = builder.node("Mul", [sign, values], f"{prefix}.values")
        shaped_q = builder.node("Reshape", [scaled, builder.shape(list(q.shape))], f"{prefix}.q")
        one = builder.constant("mcn.one", np.array(1.0, dtype=np.float32))
        zero = builder.constant("mcn.int8_zero", np.array(0, dtype=np.int8))
        builder.node("QuantizeLinear", [shaped_q, one, zero], target)
        replaced.add(target)
        rebuilt.append(row.name)
    splice_weights(graph, replaced, builder.initializers, builder.nodes)
    return tuple(rebuilt)


# --- the whole export -----------------------------------------------------------------------
@dataclasses.dataclass
class Int8ReadyGraph:
    """Step 1's result: the float graph in int8-friendly forms and what made it."""

    proto: Any
    plan: InferencePlan
    prepared: PreparedModel
    sites: list[ConvSite]
    exporter: str


def int8_ready_graph(
    model: nn.Module,
    shape: tuple[int, ...],
    *,
    opset: int,
    dynamic_batch: bool,
    exporter: str,
    threads: int,
    compute: Compute = Compute.AUTO,
    tunables: Tunables = DEFAULT_TUNABLES,
    forms: Mapping[str, Form] | None = None,
) -> Int8ReadyGraph:
    """The float ONNX graph of ``model`` (one input of ``shape``, ``(C, H, W)``) with every
    converted conv in its planned int8 form (step 1 of the module docstring)."""
    if opset < MIN_W1A8_OPSET:
        raise ConfigError(
            f"int8 activations need opset {MIN_W1A8_OPSET} or later (per-channel "
            f"QuantizeLinear), got opset {opset}"
        )
    if compute is Compute.TIME:
        raise ConfigError("compute 'time' is for PyTorch eager: use auto, factored or dense")
    prepared = prepare_for_onnx(model, "packed")
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    proto, used = torch_export(prepared.model, example, opset, dynamic_batch, "folded", exporter)
    inline_initializer_aliases(proto.graph)
    names = [layer.name for layer in prepared.layers]
    sizes = input_sizes(prepared.model, example, names)
    sites = match_conv_weights(proto.graph, prepared.layers)
    plan = plan_and_factor(proto, sites, sizes, shape, compute, threads, opset, tunables, forms)
    return Int8ReadyGraph(proto, plan, prepared, sites, used)


def w1a8_model(
    model: nn.Module,
    calibration: Iterable[object],
    shape: tuple[int, ...],
    *,
    opset: int,
    dynamic_batch: bool,
    exporter: str,
    threads: int,
    compute: Compute = Compute.AUTO,
    tunables: Tunables = DEFAULT_TUNABLES,
    forms: Mapping[str, Form] | None = None,
    max_images: int = DEFAULT_CALIBRATION_IMAGES,
) -> tuple[Any, W1A8Graph, Int8ReadyGraph]:
    """The QDQ ``ModelProto`` of ``model`` (steps 1-3 of the module docstring), its
    `W1A8Graph` and step 1's `Int8ReadyGraph`. ``calibration``: batches of images (tensors
    or ``(images, ...)`` pairs) of ``shape``, at most ``max_images`` used."""
    ready = int8_ready_graph(
        model,
        shape,
        opset=opset,
        dynamic_batch=dynamic_batch,
        exporter=exporter,
        threads=threads,
        compute=compute,
        tunables=tunables,
        forms=forms,
    )
    reader = ImageReader(ready.proto.graph.input[0].name, calibration, max_images)
    if not reader.images:
        raise DataError("no calibration images: int8 activations need at least one")
    if tuple(reader.images[0].shape[1:]) != tuple(shape):
        raise DataError(
            f"calibration images are {tuple(reader.images[0].shape[1:])} but the model input "
            f"is {tuple(shape)}: give images of the export's input size"
        )
    quantized = quantize_qdq(ready.proto, reader)
    dense_weights = {site.layer.name: site.weight for site in ready.sites}
    avoid_saturation(quantized, ready.plan)
    rebuilt = restore_bits(quantized, ready.plan, ready.prepared.layers, opset, dense_weights)
    del quantized.metadata_props[:]
    graph = W1A8Graph(plan=ready.plan, bit_layers=rebuilt, calibration_images=len(reader.images))
    return quantized, graph, ready


__all__ = [
    "ACTIVATIONS",
    "DEFAULT_CALIBRATION_IMAGES",
    "MIN_W1A8_OPSET",
    "ImageReader",
    "Int8ReadyGraph",
    "W1A8Graph",
    "int8_ready_graph",
    "plan_and_factor",
    "quantize_qdq",
    "restore_bits",
    "w1a8_model",
]
