"""The factored ONNX compute (docs/design.md section 4.8): each converted conv's ``Conv`` node
is replaced by standard operators that convolve with the H = out / K binary filters only and
combine the kernel positions with M, reading the sign bits packed as in the packed layout.

Per layer, with ``S`` the ±1 filters decoded from the uint8 bits (`GraphBuilder.signs_of`) and
``A[h, j, p] = s[h*K + j] * M[j, p]`` (s: the folded BatchNorm scale, else 1; computed from
initializers, so onnxruntime constant-folds it with the decoding at session creation):

- ``scale`` (1x1 or MCNs-1): ``Conv(x, S)`` (a ``MatMul`` for an unstrided, unpadded 1x1)
  -> Reshape (N, H, 1, L) -> the combination (below) with one position.
- ``cols``: per kernel position p a window of the zero-padded input (`_Windows`: one
  ``Slice`` each; the stride-1 window that is the input itself is not copied; stride s with
  dilation 1 slices the s*s phases of one ``SpaceToDepth``), convolved with ``S[:, :, p]``
  by a 1x1 ``Conv`` (outputs up to ``ONNX_CONV_MAX_PIXELS``; onnxruntime runs it in its
  blocked layout) or a ``MatMul`` (larger maps) -> Reshape (N, H, 1, L) -> Concat over p ->
  the combination as a 1x1 ``Conv`` with ``group = H`` (weight A, bias) -> (N, out, Ho, Wo).
- ``grid`` (groups 1): Pad -> one ``MatMul`` to P*H channels over the padded grid -> per p a
  strided ``Slice`` of its H channels -> Reshape, Concat and the combination as above.
- ``dense``: the packed layout's rebuilt Q and the original ``Conv`` (`pack_graph`).

Spatial sizes come from ONNX shape inference of the exported graph (the batch may be symbolic).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mcn_compress.formats.onnx_packing import GraphBuilder, PackedLayer
from mcn_compress.passes.factored import LayerGeometry, choose_mode

_INT_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class FactoredChoice:
    """The form one converted conv got in the factored ONNX graph, and its conv MACs."""

    name: str
    mode: str
    dense_macs: int
    macs: int


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_shapes(proto: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, for every tensor whose dims shape inference made static except
    (possibly) the batch."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    graph = inferred.graph
    for info in [*graph.value_info, *graph.input, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        values = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        if len(values) == 4 and all(v > 0 for v in values[1:]):
            shapes[info.name] = values
    return shapes


def _geometry(
    layer: PackedLayer, attrs: dict[str, Any], in_shape: tuple[int, ...]
) -> LayerGeometry:
    h, cin, kh, kw = layer.latent_shape
    k = layer.mfilter.shape[0]
    groups = int(attrs.get("group", 1))
    stride = tuple(int(v) for v in attrs.get("strides", [1, 1]))
    dilation = tuple(int(v) for v in attrs.get("dilations", [1, 1]))
    input_hw = (in_shape[2], in_shape[3])
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # output = ceil(input / stride)
        pads = [0, 0, 0, 0]  # top, left, bottom, right as in ONNX
        axes = zip(input_hw, stride, dilation, (kh, kw), strict=True)
        for axis, (size, s, d, kernel) in enumerate(axes):
            total = max((-(-size // s) - 1) * s + (kernel - 1) * d + 1 - size, 0)
            small = total // 2
            pads[axis], pads[axis + 2] = (
                (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
            )
    elif auto_pad == "NOTSET":  # explicit pads
        pads = [int(v) for v in attrs.get("pads", [0, 0, 0, 0])]
    else:  # VALID
        pads = [0, 0, 0, 0]
    return LayerGeometry(
        in_channels=cin * groups,
        out_channels=h * k,
        kernel=(kh, kw),
        stride=stride,  # type: ignore[arg-type]
        dilation=dilation,  # type: ignore[arg-type]
        pads=(pads[0], pads[2], pads[1], pads[3]),
        groups=groups,
        planes=k,
        full_m=layer.mfilter.shape[1:] != (1, 1) and (kh, kw) != (1, 1),
        input_hw=input_hw,
    )


class _Factorer:
    """Builds the replacement of one Conv node (see the module docstring)."""

    def __init__(self, builder: GraphBuilder) -> None:
        self.b = builder

    def combination(self, layer: PackedLayer, prefix: str, positions: int) -> str:
        h, _, _, _ = layer.latent_shape
        k = layer.mfilter.shape[0]
        m = layer.mfilter.astype(np.float32).reshape(1, k, -1)
        if positions > 1 and m.shape[2] == 1:
            m = np.repeat(m, positions, axis=2)
        mfilter = self.b.tensor(f"{prefix}.mfilter", m)
        if layer.scale is None:
            return mfilter
        scale = self.b.tensor(f"{prefix}.scale", layer.scale.astype(np.float32).reshape(h, k, 1))
        return self.b.node("Mul", [scale, mfilter], f"{prefix}.combine")

    def pad(
        self, x: str, geo: LayerGeometry, prefix: str, pads: tuple[int, ...] | None = None
    ) -> str:
        """``x`` zero-padded by ``pads`` (top, bottom, left, right; default the layer's)."""
        top, bottom, left, right = pads = pads or geo.pads
        if not any(pads):
            return x
        pads = self.b.constant(
            f"mcn.pads.{top}.{left}.{bottom}.{right}",
            np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64),
        )
        return self.b.node("Pad", [x, pads], f"{prefix}.padded", mode="constant")

    def window(
        self, t: str, geo: LayerGeometry, a: int, c: int, name: str, ch: tuple[int, int] | None
    ) -> str:
        (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.stride, geo.dilation
        end_h = -(kh - 1 - a) * dh or _INT_MAX
        end_w = -(kw - 1 - c) * dw or _INT_MAX
        starts, ends, axes, steps = [a * dh, c * dw], [end_h, end_w], [2, 3], [sh, sw]
        if ch is not None:
            starts, ends, axes, steps = [ch[0], *starts], [ch[1], *ends], [1, *axes], [1, *steps]
        return self.slice(t, name, starts=starts, ends=ends, axes=axes, steps=steps)

    def slice(self, t: str, name: str, **bounds: list[int]) -> str:
        """``Slice(t, starts, ends, axes[, steps])`` with the bounds as shared constants."""
        args = [t]
        for key, values in bounds.items():
            text = ".".join(str(v) for v in values)
            args.append(self.b.constant(f"mcn.slice.{key}.{text}", np.array(values, np.int64)))
        return self.b.node("Slice", args, name)

    def build(
        self,
        layer: PackedLayer,
        mode: str,
        geo: LayerGeometry,
        x: str,
        bias: str | None,
        output: str,
        prefix: str,
        signs: str | None = None,
    ) -> str:
        """Nodes computing tensor ``output``; new tensors are named ``prefix.*`` (short, so the
        node list stays a small part of the file). ``signs``: the decoded ±1 filters when an
        earlier node shares them. Returns the name of the decoded filters."""
        h, cin, kh, kw = layer.latent_shape
        positions = kh * kw
        out_hw = geo.output_hw
        pixels = out_hw[0] * out_hw[1]
        p = prefix
        g = geo.groups
        signs = signs or self.b.signs_of(layer, p)  # (H, 1, cin, kh, kw)
        if mode == "scale" and ((kh, kw) != (1, 1) or geo.stride != (1, 1) or any(geo.pads)):
            # MCNs-1 with a kh x kw kernel, or a strided / padded 1x1: one Conv with H filters
            weight = self.b.node("Reshape", [signs, self.b.shape([h, cin, kh, kw])], f"{p}.B")
            conv = _conv_attrs(geo, kernel=(kh, kw))
            z = self.b.node("Conv", [x, weight], f"{p}.z", **conv, pads=_onnx_pads(geo.pads))
        elif mode == "scale":  # 1x1: a MatMul of (g, H_g, cin) by the input
            weight = self.b.node("Reshape", [signs, self.b.shape([g, h // g, cin])], f"{p}.B")
            z = self.matmul(weight, x, g, cin, pixels, f"{p}.z")
        if mode == "scale":
            z4 = self.b.node("Reshape", [z, self.b.shape([0, h, 1, pixels])], f"{p}.z4")
            self.combine(z4, self.combination(layer, p, 1), 1, bias, layer, out_hw, output, p)
            return signs
        transposed = self.b.node("Transpose", [signs], f"{p}.Bt", perm=[3, 4, 0, 1, 2])
        parts = []
        if mode == "grid":
            xp = self.pad(x, geo, p)
            hp, wp = geo.padded_hw
            weight = self.b.node(
                "Reshape", [transposed, self.b.shape([1, positions * h, cin])], f"{p}.Bg"
            )
            flat = self.matmul(weight, xp, 1, cin, hp * wp, f"{p}.zflat")
            z = self.b.node("Reshape", [flat, self.b.shape([0, positions * h, hp, wp])], f"{p}.zg")
        else:
            windows = _Windows(self, x, geo, p)
            per_position = self.b.node(
                "Reshape", [transposed, self.b.shape([positions, h, cin, 1, 1])], f"{p}.Bp"
            )
        for index in range(positions):
            a, c = divmod(index, kw)
            if mode == "grid":
                zp = self.window(z, geo, a, c, f"{p}.z{index}", (index * h, (index + 1) * h))
            else:
                xw = windows.at(a, c, f"{p}.x{index}")
                idx = self.b.constant(f"mcn.index.{index}", np.array(index, dtype=np.int64))
                wp_ = self.b.node("Gather", [per_position, idx], f"{p}.B{index}", axis=0)
                if pixels <= ONNX_CONV_MAX_PIXELS:
                    zp = self.b.node(
                        "Conv", [xw, wp_], f"{p}.z{index}", kernel_shape=[1, 1], group=g
                    )
                else:
                    wm = self.b.node(
                        "Reshape", [wp_, self.b.shape([g, h // g, cin])], f"{p}.B{index}m"
                    )
                    zp = self.matmul(wm, xw, g, cin, pixels, f"{p}.z{index}")
            parts.append(
                self.b.node("Reshape", [zp, self.b.shape([0, h, 1, pixels])], f"{p}.r{index}")
            )
        zc = self.b.node("Concat", parts, f"{p}.zcat", axis=2)
        a = self.combination(layer, p, positions)
        self.combine(zc, a, positions, bias, layer, out_hw, output, p)
        return signs

    def combine(
        self,
        z: str,
        a: str,
        positions: int,
        bias: str | None,
        layer: PackedLayer,
        out_hw: tuple[int, int],
        output: str,
        p: str,
    ) -> None:
        """``y[h*K + j] = sum_p A[h, j, p] * z[h, p] + bias`` from z of shape (N, H, P, L)."""
        h = layer.latent_shape[0]
        k = layer.mfilter.shape[0]
        full = self.b.shape([h, k, positions])
        a_full = self.b.node("Expand", [a, full], f"{p}.A")
        weight = self.b.node("Reshape", [a_full, self.b.shape([h * k, positions, 1, 1])], f"{p}.W")
        zz = self.b.node("Reshape", [z, self.b.shape([0, h * positions, *out_hw])], f"{p}.zz")
        inputs = [zz, weight] + ([bias] if bias is not None else [])
        self.b.node("Conv", inputs, output, kernel_shape=[1, 1], group=h)

    def matmul(self, weight: str, x: str, groups: int, cin: int, pixels: int, name: str) -> str:
        """``(g, Hx, cin) @ x`` viewed as ``(N, g, cin, pixels)``: shape ``(N, g, Hx, pixels)``."""
        view = self.b.node("Reshape", [x, self.b.shape([0, groups, cin, pixels])], f"{name}.in")
        return self.b.node("MatMul", [weight, view], name)


class _Windows:
    """The ``kh*kw`` shifted, strided windows of a layer's zero-padded input that ``cols``
    convolves (window ``(a, c)``: ``x_pad[:, a*d + s*i, c*d + s*j]``), each made by one
    ``Slice``; the padded input (or its `SpaceToDepth`) is built on first use. Stride 1: the
    window that is the unpadded input itself is not copied. Stride s in both axes, dilation 1:
    the padded input is rearranged once by ``SpaceToDepth(s)``, so every window is a
    contiguous slice of one of its s*s phases (a strided Slice copies element by element)."""

    def __init__(self, factorer: _Factorer, x: str, geo: LayerGeometry, prefix: str) -> None:
        self.f, self.x, self.geo, self.prefix = factorer, x, geo, prefix
        s = geo.stride[0]
        self.block = s if s > 1 and geo.stride == (s, s) and geo.dilation == (1, 1) else 1
        self._source: str | None = None

    def source(self) -> str:
        if self._source is None:
            geo, s = self.geo, self.block
            if s == 1:
                self._source = self.f.pad(self.x, geo, self.prefix)
            else:
                hp, wp = geo.padded_hw
                top, bottom, left, right = geo.pads
                pads = (top, bottom + (-hp) % s, left, right + (-wp) % s)
                padded = self.f.pad(self.x, geo, self.prefix, pads)
                self._source = self.f.b.node(
                    "SpaceToDepth", [padded], f"{self.prefix}.s2d", blocksize=s
                )
        return self._source

    def at(self, a: int, c: int, name: str) -> str:
        geo = self.geo
        (dh, dw), (top, _, left, _) = geo.dilation, geo.pads
        unshifted = geo.stride == (1, 1) and (a * dh, c * dw) == (top, left)
        if unshifted and geo.output_hw == geo.input_hw:
            return self.x
        if self.block == 1:
            return self.f.window(self.source(), geo, a, c, name, None)
        s, (ho, wo), channels = self.block, geo.output_hw, geo.in_channels
        phase = (a % s) * s + c % s
        starts = [phase * channels, a // s, c // s]
        ends = [(phase + 1) * channels, a // s + ho, c // s + wo]
        return self.f.slice(self.source(), name, starts=starts, ends=ends, axes=[1, 2, 3])


# cols: a 1x1 Conv per position up to 32x32 output pixels, else MatMul (onnxruntime, 1 thread:
# the Conv was 0.6-0.9x the MatMul's time at 7x7 to 28x28 maps and 1.1x at 56x56)
ONNX_CONV_MAX_PIXELS = 1024
ONNX_MIN_SAVED_MACS = 8_000_000  # per image; fitted to onnxruntime 1-thread CPU timings


def choose_onnx_mode(geo: LayerGeometry) -> str:
    """`choose_mode`, except that a layer whose factored form saves fewer than
    ``ONNX_MIN_SAVED_MACS`` conv MACs per image stays dense: onnxruntime runs its dense convs in
    a blocked layout (NCHWc) with fused activations, and each factored layer adds a dozen
    nodes and layout reorders that small layers do not earn back (docs/design.md section 4.8)."""
    mode = choose_mode(geo)
    if mode != "dense" and geo.macs("dense") - geo.macs(mode) < ONNX_MIN_SAVED_MACS:
        return "dense"
    return mode


def _onnx_pads(pads: tuple[int, int, int, int]) -> list[int]:
    top, bottom, left, right = pads
    return [top, left, bottom, right]


def _conv_attrs(geo: LayerGeometry, kernel: tuple[int, int]) -> dict[str, Any]:
    return {
        "kernel_shape": list(kernel),
        "strides": list(geo.stride),
        "dilations": list(geo.dilation),
        "group": geo.groups,
    }


def factor_graph(
    proto: Any,
    layers: list[PackedLayer],
    compute: str,
    opset: int,
    input_hw: dict[str, tuple[int, int]] | None = None,
) -> tuple[list[PackedLayer], list[FactoredChoice]]:
    """Replace the Conv node of each layer whose form (by `choose_mode`, or forced by
    ``compute="factored"``) is not dense; returns the layers left dense (for `pack_graph`) and
    one `FactoredChoice` per layer. ``input_hw``: each layer's input height and width as
    PyTorch saw them, for convs whose input shape ONNX shape inference leaves open."""
    from onnx import numpy_helper

    graph = proto.graph
    shapes = _static_shapes(proto)
    initializers = {init.name: init for init in graph.initializer}
    convs: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            convs.setdefault(node.input[1], []).append(node)
    weights = {
        name: numpy_helper.to_array(initializers[name]) for name in convs if name in initializers
    }
    builder = GraphBuilder(opset, [n for n in initializers if n.startswith("mcn.")])
    factorer = _Factorer(builder)
    replacement: dict[int, list[Any]] = {}
    dense: list[PackedLayer] = []
    choices: list[FactoredChoice] = []
    done: dict[str, str] = {}  # weight initializer -> mode (the exporter merges equal weights)
    for layer in layers:
        target = f"{layer.name}.weight"
        if target not in weights or not np.array_equal(weights[target], layer.weight):
            target = next((n for n, w in weights.items() if np.array_equal(w, layer.weight)), "")
        nodes = convs.get(target, [])
        known = dict(shapes)
        if len(nodes) == 1 and nodes[0].input[0] not in known and layer.name in (input_hw or {}):
            known[nodes[0].input[0]] = (1, 1, *(input_hw or {})[layer.name])
        geos = {
            _geometry(layer, _attrs(n), known[n.input[0]]) if n.input[0] in known else None
            for n in nodes
        }
        if target in done:
            mode = done[target]
        elif not nodes or None in geos or len(geos) != 1:
            mode = "dense"
        else:
            mode = choose_onnx_mode(next(iter(geos)))  # type: ignore[arg-type]
            if mode == "dense" and compute == "factored":
                mode = "scale" if not next(iter(geos)).full_m else "cols"  # type: ignore[union-attr]
        if None not in geos and geos:
            geo = next(iter(geos))
            assert geo is not None
            choices.append(FactoredChoice(layer.name, mode, geo.macs("dense"), geo.macs(mode)))
        if mode == "dense":
            dense.append(layer)
            continue
        if target in done:
            continue
        done[target] = mode
        signs = None
        for node in nodes:
            start = len(builder.nodes)
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            prefix = f"mcn.f{len(replacement)}"
            signs = factorer.build(
                layer, mode, geo, node.input[0], bias, node.output[0], prefix, signs
            )
            replacement[id(node)] = builder.nodes[start:]
    new_nodes = []
    for node in graph.node:
        new_nodes.extend(replacement.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [init for init in graph.initializer if init.name not in done]
    del graph.initializer[:]
    graph.initializer.extend(kept + builder.initializers)
    return dense, choices
