"""The factored ONNX compute (docs/design.md section 4.8): each converted conv's ``Conv`` node
is replaced by standard operators that convolve with the H = out / K binary filters only and
combine the kernel positions with M, reading the sign bits packed as in the packed layout.

`factor_graph` runs three steps: **match** each converted layer to the ``Conv`` nodes that read
its weight (`onnx_packing.match_conv_weights`: by initializer name, else by value), **plan** it
(its `passes.planner.Geometry` from the node's attributes and the inferred input shape, then
the planner's form for onnxruntime at the target thread count) and **emit** the nodes of that
form (`_Emitter`). Tunables come in as a `passes.planner.Tunables` argument.

Per layer, with ``S`` the ±1 filters decoded from the uint8 bits (`GraphBuilder.signs_of`) and
``A[h, j, p] = s[h*K + j] * M[j, p]`` (s: the folded BatchNorm scale, else 1; computed from
initializers, so onnxruntime constant-folds it with the decoding at session creation):

- ``scale`` (1x1 or MCNs-1): ``Conv(x, S)`` (a ``MatMul`` for an unstrided, unpadded 1x1)
  -> Reshape (N, H, 1, L) -> the combination (below) with one position.
- ``cols``: per kernel position p a window of the zero-padded input (`_Windows`: one
  ``Slice`` each; the stride-1 window that is the input itself is not copied; stride s with
  dilation 1 slices the s*s phases of one ``SpaceToDepth``), convolved with ``S[:, :, p]``
  by a 1x1 ``Conv`` (outputs up to ``Tunables.onnx_conv_max_pixels``; onnxruntime runs it in
  its blocked layout) or a ``MatMul`` (larger maps) -> Reshape (N, H, 1, L) -> Concat over p
  -> the combination as a 1x1 ``Conv`` with ``group = H`` (weight A, bias) -> (N, out, Ho, Wo).
- ``grid`` (groups 1): Pad -> one ``MatMul`` to P*H channels over the padded grid -> per p a
  strided ``Slice`` of its H channels -> Reshape, Concat and the combination as above.
- ``dense``: the packed layout's rebuilt Q and the original ``Conv`` (`pack_graph`).

Spatial sizes come from ONNX shape inference of the exported graph (the batch may be symbolic),
else from a PyTorch forward (``input_hw``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from mcn_compress.errors import ConfigError
from mcn_compress.formats.onnx_packing import (
    ConvSite,
    GraphBuilder,
    PackedLayer,
    match_conv_weights,
)
from mcn_compress.passes.planner import (
    DEFAULT_TUNABLES,
    Backend,
    Compute,
    Form,
    Geometry,
    InferencePlan,
    LayerPlan,
    Tunables,
    candidates,
    plan_layer,
    resolve_pads,
)

_INT_MAX = np.iinfo(np.int64).max


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


def node_geometry(layer: PackedLayer, node: Any, input_hw: tuple[int, int]) -> Geometry:
    """The `Geometry` of ``layer`` as the ONNX ``Conv`` ``node`` runs it on ``input_hw``
    (explicit ``pads``, or ``auto_pad`` as the TorchScript exporter writes it)."""
    attrs = _attrs(node)
    h, cin, kh, kw = layer.latent_shape
    k = layer.mfilter.shape[0]
    groups = int(attrs.get("group", 1))
    stride = (int(attrs.get("strides", [1, 1])[0]), int(attrs.get("strides", [1, 1])[1]))
    dilation = (int(attrs.get("dilations", [1, 1])[0]), int(attrs.get("dilations", [1, 1])[1]))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad == "NOTSET":
        top, left, bottom, right = (int(v) for v in attrs.get("pads", [0, 0, 0, 0]))
        pads = (top, bottom, left, right)
    else:
        pads = resolve_pads(auto_pad, (kh, kw), stride, dilation, input_hw)
    return Geometry(
        in_channels=cin * groups,
        out_channels=h * k,
        kernel=(kh, kw),
        stride=stride,
        dilation=dilation,
        pads=pads,
        groups=groups,
        planes=k,
        full_m=layer.mfilter.shape[1:] != (1, 1) and (kh, kw) != (1, 1),
        input_hw=input_hw,
    )


class _Emitter:
    """Emits the replacement of one Conv node in its planned form (module docstring)."""

    def __init__(self, builder: GraphBuilder, tunables: Tunables) -> None:
        self.b = builder
        self.conv_max_pixels = tunables.onnx_conv_max_pixels

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

    def pad(self, x: str, geo: Geometry, prefix: str, pads: tuple[int, ...] | None = None) -> str:
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
        self, t: str, geo: Geometry, a: int, c: int, name: str, ch: tuple[int, int] | None
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
        form: Form,
        geo: Geometry,
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
        if form is Form.SCALE and ((kh, kw) != (1, 1) or geo.stride != (1, 1) or any(geo.pads)):
            # MCNs-1 with a kh x kw kernel, or a strided / padded 1x1: one Conv with H filters
            weight = self.b.node("Reshape", [signs, self.b.shape([h, cin, kh, kw])], f"{p}.B")
            conv = _conv_attrs(geo, kernel=(kh, kw))
            z = self.b.node("Conv", [x, weight], f"{p}.z", **conv, pads=_onnx_pads(geo.pads))
        elif form is Form.SCALE:  # 1x1: a MatMul of (g, H_g, cin) by the input
            weight = self.b.node("Reshape", [signs, self.b.shape([g, h // g, cin])], f"{p}.B")
            z = self.matmul(weight, x, g, cin, pixels, f"{p}.z")
        if form is Form.SCALE:
            z4 = self.b.node("Reshape", [z, self.b.shape([0, h, 1, pixels])], f"{p}.z4")
            self.combine(z4, self.combination(layer, p, 1), 1, bias, layer, out_hw, output, p)
            return signs
        transposed = self.b.node("Transpose", [signs], f"{p}.Bt", perm=[3, 4, 0, 1, 2])
        parts = []
        if form is Form.GRID:
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
            if form is Form.GRID:
                zp = self.window(z, geo, a, c, f"{p}.z{index}", (index * h, (index + 1) * h))
            else:
                xw = windows.at(a, c, f"{p}.x{index}")
                idx = self.b.constant(f"mcn.index.{index}", np.array(index, dtype=np.int64))
                wp_ = self.b.node("Gather", [per_position, idx], f"{p}.B{index}", axis=0)
                if pixels <= self.conv_max_pixels:
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

    def __init__(self, factorer: _Emitter, x: str, geo: Geometry, prefix: str) -> None:
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


def _onnx_pads(pads: tuple[int, int, int, int]) -> list[int]:
    top, bottom, left, right = pads
    return [top, left, bottom, right]


def _conv_attrs(geo: Geometry, kernel: tuple[int, int]) -> dict[str, Any]:
    return {
        "kernel_shape": list(kernel),
        "strides": list(geo.stride),
        "dilations": list(geo.dilation),
        "group": geo.groups,
    }


def plan_sites(
    proto: Any,
    sites: list[ConvSite],
    compute: Compute,
    threads: int,
    tunables: Tunables = DEFAULT_TUNABLES,
    input_hw: Mapping[str, tuple[int, int]] | None = None,
    forms: Mapping[str, Form] | None = None,
) -> list[LayerPlan]:
    """One `LayerPlan` per matched layer whose input size is known and whose Conv nodes agree
    on one geometry (an exporter that merged equal weights may feed one initializer to several
    convs); any other layer stays dense and unplanned. ``input_hw``: each layer's input height
    and width as PyTorch saw them, for convs whose input shape ONNX leaves open. ``forms``:
    layer name -> the form it must take, instead of the planner's choice.

    Raises:
        ConfigError: a form in ``forms`` does not fit its layer.
    """
    shapes = _static_shapes(proto)
    plans = []
    for site in sites:
        geos = set()
        for node in site.nodes:
            shape = shapes.get(node.input[0])
            hw = (shape[2], shape[3]) if shape else None
            if hw is None and len(site.nodes) == 1:
                hw = (input_hw or {}).get(site.layer.name)
            geos.add(node_geometry(site.layer, node, hw) if hw else None)
        if len(geos) == 1 and None not in geos:
            geo = next(iter(geos))
            assert geo is not None
            name, folded = site.layer.name, site.layer.folded_batchnorm
            if forms is not None and name in forms:
                plans.append(LayerPlan(name, geo, _fitting(forms[name], geo, name), folded))
                continue
            plan = plan_layer(name, geo, compute, Backend.ONNXRUNTIME, threads, tunables=tunables)
            plans.append(dataclasses.replace(plan, folded_batchnorm=folded))
    return plans


def _fitting(form: Form, geo: Geometry, name: str) -> Form:
    if form is not Form.DENSE and form not in candidates(geo):
        allowed = ", ".join(f.value for f in [Form.DENSE, *candidates(geo)])
        raise ConfigError(f"layer {name}: form {form.value!r} does not fit (allowed: {allowed})")
    return form


def factor_graph(
    proto: Any,
    layers: list[PackedLayer],
    compute: Compute,
    opset: int,
    threads: int,
    *,
    tunables: Tunables = DEFAULT_TUNABLES,
    input_hw: Mapping[str, tuple[int, int]] | None = None,
    input_shape: tuple[int, ...] = (),
    forms: Mapping[str, Form] | None = None,
) -> tuple[list[PackedLayer], InferencePlan]:
    """Match, plan and emit (module docstring): replace the Conv nodes of each layer planned
    factored. Returns the layers left dense (for `pack_graph`) and the `InferencePlan`."""
    sites = match_conv_weights(proto.graph, layers)
    plans = plan_sites(proto, sites, compute, threads, tunables, input_hw, forms)
    by_name = {plan.name: plan for plan in plans}
    builder = GraphBuilder(
        opset, [i.name for i in proto.graph.initializer if i.name.startswith("mcn.")]
    )
    emitter = _Emitter(builder, tunables)
    replacement: dict[int, list[Any]] = {}
    dense: list[PackedLayer] = []
    emitted: set[str] = set()  # weight initializers already replaced
    for site in sites:
        plan = by_name.get(site.layer.name)
        if plan is None or plan.form is Form.DENSE:
            dense.append(site.layer)
            continue
        if site.weight in emitted:  # the exporter merged equal weights: already rebuilt
            continue
        emitted.add(site.weight)
        signs = None
        for node in site.nodes:
            start = len(builder.nodes)
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            prefix = f"mcn.f{len(replacement)}"
            signs = emitter.build(
                site.layer,
                plan.form,
                plan.geometry,
                node.input[0],
                bias,
                node.output[0],
                prefix,
                signs,
            )
            replacement[id(node)] = builder.nodes[start:]
    graph = proto.graph
    new_nodes = []
    for node in graph.node:
        new_nodes.extend(replacement.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [init for init in graph.initializer if init.name not in emitted]
    del graph.initializer[:]
    graph.initializer.extend(kept + builder.initializers)
    plan = InferencePlan(Backend.ONNXRUNTIME, compute, threads, input_shape, tuple(plans))
    return dense, plan
