"""The packed ONNX layout: replace each converted conv's float weight by sign bits + M and
a subgraph of standard operators that rebuilds it (docs/design.md section 4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from mcn_compress.errors import ExportError

BITWISE_AND_OPSET = 18


@dataclasses.dataclass
class PackedLayer:
    """One converted conv as the packed layout stores it, and the weight it must rebuild."""

    name: str
    signs: np.ndarray  # uint8, pack_signs order
    latent_shape: tuple[int, ...]  # (out // K, in // groups, kh, kw)
    mfilter: np.ndarray  # (K, kh|1, kw|1)
    weight: np.ndarray  # the folded Conv weight the subgraph must reproduce
    scale: np.ndarray | None = None  # BatchNorm scale per output channel, when folded
    folded_batchnorm: str | None = None  # the name of that BatchNorm


@dataclasses.dataclass
class ConvSite:
    """Where one converted layer sits in an ONNX graph: the initializer holding its weight
    (``""`` when none was found) and the ``Conv`` nodes that read it."""

    layer: PackedLayer
    weight: str
    nodes: list[Any]


class GraphBuilder:
    """Adds nodes and initializers to the packed graph; shared constants are added once.

    ``existing``: initializer names already in the graph; a shared constant of that name
    (its name encodes its value) is reused rather than added again.
    """

    def __init__(self, opset: int, existing: Sequence[str] = ()) -> None:
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._constants: dict[str, str] = {name: name for name in existing}

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self._constants:
            self.initializers.append(numpy_helper.from_array(value, name))
            self._constants[name] = name
        return name

    def shape(self, dims: Sequence[int]) -> str:
        key = "x".join(str(d) for d in dims)
        return self.constant(f"mcn.shape.{key}", np.asarray(dims, dtype=np.int64))

    def tensor(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{output}/{op}", **attrs))
        return output

    def signs_of(self, layer: PackedLayer, prefix: str) -> str:
        """The subgraph that decodes ``layer.signs`` into a float ±1 tensor of shape
        ``(h, 1, cin, kh, kw)`` (``prefix`` names its tensors); returns the tensor's name."""
        from onnx import TensorProto

        h, cin, kh, kw = layer.latent_shape
        numel = h * cin * kh * kw
        p = f"{prefix}.unpack"
        signs = self.tensor(f"{prefix}.signs", layer.signs.astype(np.uint8))
        column = self.node("Reshape", [signs, self.shape([-1, 1])], f"{p}.bytes")
        shifts = self.constant("mcn.bit_shifts", np.arange(8, dtype=np.uint8))
        shifted = self.node("BitShift", [column, shifts], f"{p}.shifted", direction="RIGHT")
        if self.opset >= BITWISE_AND_OPSET:
            one = self.constant("mcn.bit_one", np.array(1, dtype=np.uint8))
            bits = self.node("BitwiseAnd", [shifted, one], f"{p}.bits")
        else:
            two = self.constant("mcn.bit_two", np.array(2, dtype=np.uint8))
            bits = self.node("Mod", [shifted, two], f"{p}.bits", fmod=0)
        flat = self.node("Reshape", [bits, self.shape([-1])], f"{p}.flat")
        if layer.signs.size * 8 != numel:
            start = self.constant("mcn.zero", np.array([0], dtype=np.int64))
            end = self.constant(f"mcn.end.{numel}", np.array([numel], dtype=np.int64))
            flat = self.node("Slice", [flat, start, end], f"{p}.trimmed")
        grid = self.node("Reshape", [flat, self.shape([h, 1, cin, kh, kw])], f"{p}.grid")
        as_float = self.node("Cast", [grid], f"{p}.float", to=TensorProto.FLOAT)
        two_f = self.constant("mcn.two", np.array(2.0, dtype=np.float32))
        one_f = self.constant("mcn.one", np.array(1.0, dtype=np.float32))
        doubled = self.node("Mul", [as_float, two_f], f"{p}.doubled")
        return self.node("Sub", [doubled, one_f], f"{p}.sign")

    def unpack(self, layer: PackedLayer, output: str) -> None:
        """The subgraph that rebuilds ``layer.weight`` into tensor ``output``."""
        h, cin, kh, kw = layer.latent_shape
        k = layer.mfilter.shape[0]
        p = f"{output}.unpack"
        sign = self.signs_of(layer, output)
        mfilter = self.tensor(
            f"{output}.mfilter",
            layer.mfilter.astype(np.float32).reshape(1, k, 1, *layer.mfilter.shape[1:]),
        )
        modulated = self.node("Mul", [sign, mfilter], f"{p}.modulated")
        out_shape = self.shape([h * k, cin, kh, kw])
        if layer.scale is None:
            self.node("Reshape", [modulated, out_shape], output)
            return
        q = self.node("Reshape", [modulated, out_shape], f"{p}.q")
        scale = self.tensor(f"{output}.scale", layer.scale.reshape(-1, 1, 1, 1))
        self.node("Mul", [q, scale], output)


def inline_initializer_aliases(graph: Any) -> None:
    """Drop ``Identity`` nodes that merely rename an initializer; consumers read it directly.

    The TorchScript exporter deduplicates equal initializers into one and such aliases; the
    packed rewrite needs each conv's weight to be an initializer read by ``Conv`` only.
    """
    from onnx import AttributeProto

    if any(
        attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
        for node in graph.node
        for attr in node.attribute
    ):
        return  # subgraphs may read the aliases: leave the graph as it is
    initializers = {init.name for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in graph.node:
        source = node.input[0] if node.op_type == "Identity" and node.input else ""
        source = alias.get(source, source)
        if source in initializers and node.output[0] not in outputs:
            alias[node.output[0]] = source
            continue
        kept.append(node)
    if not alias:
        return
    for node in kept:
        for index, name in enumerate(node.input):
            if name in alias:
                node.input[index] = alias[name]
    del graph.node[:]
    graph.node.extend(kept)


def _array_key(array: np.ndarray) -> tuple[Any, ...]:
    """Hashable key of an array's value; -0.0 and 0.0 count as equal (as the exporter does)."""
    canonical = array + 0 if array.dtype.kind == "f" else array
    return (array.dtype.str, array.shape, hash(np.ascontiguousarray(canonical).tobytes()))


def match_conv_weights(graph: Any, layers: Sequence[PackedLayer]) -> list[ConvSite]:
    """One `ConvSite` per layer, in order: the initializer that only ``Conv`` weight inputs
    read and that equals the layer's weight, found by the name ``<layer>.weight`` (the
    exporters keep parameter names), else by value (hashed, so renamed initializers cost one
    pass; the exporter may also merge equal weights into one initializer)."""
    from onnx import numpy_helper

    uses: dict[str, list[tuple[str, int]]] = {}
    convs: dict[str, list[Any]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, index))
        if node.op_type == "Conv" and len(node.input) > 1:
            convs.setdefault(node.input[1], []).append(node)
    conv_weights: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        if uses.get(init.name) and all(use == ("Conv", 1) for use in uses[init.name]):
            conv_weights[init.name] = numpy_helper.to_array(init)
    by_value: dict[tuple[Any, ...], list[str]] = {}  # built on first need (hashing costs)
    sites = []
    for layer in layers:
        target = f"{layer.name}.weight"
        if target not in conv_weights or not np.array_equal(conv_weights[target], layer.weight):
            if not by_value:
                for name, array in conv_weights.items():
                    by_value.setdefault(_array_key(array), []).append(name)
            found = by_value.get(_array_key(layer.weight), [])
            target = next((n for n in found if np.array_equal(conv_weights[n], layer.weight)), "")
        sites.append(ConvSite(layer, target, convs.get(target, []) if target else []))
    return sites


def pack_graph(proto: Any, layers: list[PackedLayer], opset: int) -> list[str]:
    """Replace each converted conv's float weight initializer by bits + M + unpack subgraph.

    Returns the names of the packed layers. A layer whose weight does not reach a ``Conv``
    weight input unchanged raises `ExportError` naming it.
    """
    graph = proto.graph
    existing = [init.name for init in graph.initializer if init.name.startswith("mcn.")]
    builder = GraphBuilder(opset, existing)
    replaced: set[str] = set()
    packed: list[str] = []
    for site in match_conv_weights(graph, layers):
        if not site.weight:
            raise ExportError(
                f"cannot pack layer {site.layer.name}: its weight does not reach an ONNX Conv "
                "unchanged (the model reads it outside the conv, or the layer is never called "
                "in forward); export with --weights folded"
            )
        packed.append(site.layer.name)
        if site.weight in replaced:  # the exporter merged identical weights: already rebuilt
            continue
        replaced.add(site.weight)
        builder.unpack(site.layer, site.weight)

    splice_weights(graph, replaced, builder.initializers, builder.nodes)
    return packed


def splice_weights(
    graph: Any, replaced: set[str], initializers: Sequence[Any], nodes: Sequence[Any]
) -> None:
    """Drop the initializers (and graph inputs) named in ``replaced``, add ``initializers``,
    and put ``nodes``, which now compute those names, in front of the graph's nodes."""
    kept = [init for init in graph.initializer if init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *initializers])
    all_nodes = [*nodes, *graph.node]
    del graph.node[:]
    graph.node.extend(all_nodes)
    graph_inputs = [i for i in graph.input if i.name not in replaced]
    del graph.input[:]
    graph.input.extend(graph_inputs)
