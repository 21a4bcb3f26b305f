"""ONNX export of MCN models that a stock ONNX runtime runs (DESIGN.md section 4, ``export``).

Two weight layouts, both plain ONNX in the default domain (no custom operators):

- ``folded``: every `MCConv2d` becomes an ordinary ``Conv`` whose float initializer is the
  reconstructed filter ``Q[h*K + j, c] = B[h, c] * M[j]`` (DESIGN.md section 2). Runs anywhere.
- ``packed`` (default): the sign bits B are stored as a uint8 initializer in the bit order of
  `mcn_compress.export.pack_signs` (element ``i`` of the row-major latent shape
  ``(out // K, in // groups, kh, kw)`` is bit ``i % 8`` of byte ``i // 8``, least significant
  first, 1 = +1) next to M, and a small subgraph of standard operators rebuilds the weight in the
  graph and feeds it to the same ``Conv``::

      bytes --Reshape(-1, 1)--> BitShift(RIGHT, [0..7]) --> BitwiseAnd 1 (opset >= 18) or Mod 2
            --Reshape(-1)--> [Slice to numel] --Reshape(h, 1, c, kh, kw)--> Cast(float)
            --> *2 - 1 (B) --> * M (1, K, 1, kh|1, kw|1) --Reshape(out, c, kh, kw)--> [* s] --> Conv

  Every input of that subgraph is an initializer, so onnxruntime constant-folds it once when the
  session is created (graph optimisation level ``ORT_ENABLE_BASIC`` or higher; the default is
  ``ORT_ENABLE_ALL``); with optimisations disabled the unpacking would run on every inference.

BatchNorm (DESIGN.md section 2, "Storage kept after training"): an eval-mode ``BatchNorm2d``
(or timm ``BatchNormAct2d``) that is the only consumer of a conv's output is folded into that
conv in PyTorch before export, in both layouts: ``s = gamma / sqrt(var + eps)``, weight ``W * s``
per output channel, bias ``(b - mean) * s + beta``. In the packed layout the scale stays a
separate ``(out, 1, 1, 1)`` initializer multiplied in the subgraph (``Q * s``, the same float
operation as the folded layout, so both give bit-identical weights), which keeps M at its
``(K, kh, kw)`` shape and costs one float per output channel instead of BatchNorm's four.
BatchNorms that do not directly follow a conv (e.g. DenseNet's pre-activation) stay
``BatchNormalization`` nodes.

Exporter: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). The
torch.export-based exporter (the default since torch 2.9) needs ``onnxscript``, which is not a
dependency here; the TorchScript one is offline, deterministic and keeps parameter names as
initializer names, which is how the packed rewrite finds each converted conv's weight (checked
by value, too). Numbers and files only: nothing here prints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mcn_compress.checkpoint import atomic_write
from mcn_compress.errors import ConfigError, ExportError
from mcn_compress.export import pack_signs
from mcn_compress.nn.mcconv import MCConv2d

_logger = logging.getLogger(__name__)

WEIGHT_LAYOUTS = ("packed", "folded")
DEFAULT_OPSET = 18
MIN_OPSET = 11  # BitShift
MAX_OPSET = 20  # the TorchScript exporter's maximum
BITWISE_AND_OPSET = 18
DEFAULT_SIZE = 224
INPUT_NAME = "input"
OUTPUT_NAME = "output"
_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit on one serialised message
_OP_PATTERNS = (  # how the TorchScript exporter names the operator it failed on
    re.compile(r"operator '((?:aten|prim|quantized)::\w+)'"),
    re.compile(r"ONNX export of operator (\w+)"),
    re.compile(r"\b((?:aten|prim|quantized)::\w+)"),
)


@dataclasses.dataclass(frozen=True)
class OnnxExportResult:
    """What `export_onnx` wrote: the file, its layout and which layers were packed or folded."""

    path: Path
    weights: str
    opset: int
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    bytes: int
    packed_layers: tuple[str, ...] = ()
    folded_batchnorms: tuple[str, ...] = ()
    sign_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.path),
            "weights": self.weights,
            "opset": self.opset,
            "input_shape": list(self.input_shape),
            "dynamic_batch": self.dynamic_batch,
            "bytes": self.bytes,
            "packed_layers": len(self.packed_layers),
            "folded_batchnorms": len(self.folded_batchnorms),
            "sign_bytes": self.sign_bytes,
        }


@dataclasses.dataclass
class _PackedLayer:
    """One converted conv as the packed layout stores it, and the weight it must rebuild."""

    name: str
    signs: np.ndarray  # uint8, pack_signs order
    latent_shape: tuple[int, ...]  # (out // K, in // groups, kh, kw)
    mfilter: np.ndarray  # (K, kh|1, kw|1)
    weight: np.ndarray  # the folded Conv weight the subgraph must reproduce
    scale: np.ndarray | None = None  # BatchNorm scale per output channel, when folded


@dataclasses.dataclass
class _Prepared:
    model: nn.Module
    layers: list[_PackedLayer]
    folded_batchnorms: dict[str, str] = dataclasses.field(default_factory=dict)  # conv -> bn


# --- options --------------------------------------------------------------------------------
def _check_options(weights: str, opset: int) -> None:
    if weights not in WEIGHT_LAYOUTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHT_LAYOUTS)}, got {weights!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(
            f"opset {opset} is out of range: use {MIN_OPSET}..{MAX_OPSET} "
            f"(BitShift needs {MIN_OPSET}; the TorchScript exporter stops at {MAX_OPSET})"
        )


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


# --- PyTorch side: fold MCConv2d and BatchNorm ----------------------------------------------
def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


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


def fold_batchnorms(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Fold, in place, each eval BatchNorm that alone consumes a plain ``nn.Conv2d`` output.

    Returns ``{conv name: (bn name, per-channel scale s)}``. The conv's weight becomes
    ``W * s`` and its bias ``(b - mean) * s + beta``; the BatchNorm is replaced by Identity
    (or by its drop and activation for timm's ``BatchNormAct2d``). Needs torch.fx tracing
    (`mcn_compress.tracing`); an untraceable model is left unchanged (DESIGN.md section 4).
    """
    from torch import fx

    from mcn_compress.tracing import trace

    try:
        gm = trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "do not fold"
        _logger.info(
            "BatchNorm not folded before export: torch.fx cannot trace the model (%s)", exc
        )
        return {}
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    folded: dict[str, tuple[str, torch.Tensor]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules.get(str(node.target))) is not nn.Conv2d:
            continue
        users: list[fx.Node] = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args != (node,):
            continue
        conv_name, bn_name = str(node.target), str(users[0].target)
        conv, bn = modules[conv_name], modules[bn_name]
        replacement = _foldable_bn(bn)
        if replacement is None or users[0].kwargs or calls[conv_name] != 1 or calls[bn_name] != 1:
            continue
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        with torch.no_grad():
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
            scale = gamma / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            new_bias = (bias - bn.running_mean) * scale + beta
            conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(new_bias, requires_grad=False)
        _set_submodule(model, bn_name, replacement)
        folded[conv_name] = (bn_name, scale.detach().clone())
    return folded


def _prepare(model: nn.Module, weights: str) -> _Prepared:
    """A float32 eval copy with MCConv2d -> Conv2d (weight Q) and BatchNorm folded."""
    work = copy.deepcopy(model).cpu().float().eval()
    converted: dict[str, MCConv2d] = {
        name: m for name, m in work.named_modules() if isinstance(m, MCConv2d)
    }
    layers: dict[str, _PackedLayer] = {}
    with torch.no_grad():
        for name, mod in converted.items():
            if weights == "packed":
                layers[name] = _PackedLayer(
                    name=name,
                    signs=pack_signs(mod.weight).numpy(),
                    latent_shape=tuple(mod.weight.shape),
                    mfilter=mod.mfilter.detach().cpu().numpy().copy(),
                    weight=np.empty(0, np.float32),
                )
            _set_submodule(work, name, mod.to_conv2d())
    folds = fold_batchnorms(work)
    modules = dict(work.named_modules())
    for name, layer in layers.items():
        conv = modules[name]
        assert isinstance(conv, nn.Conv2d)
        layer.weight = conv.weight.detach().cpu().numpy().copy()
        if name in folds:
            layer.scale = folds[name][1].cpu().numpy().astype(np.float32)
    return _Prepared(work, list(layers.values()), {c: bn for c, (bn, _) in folds.items()})


# --- torch.onnx.export ----------------------------------------------------------------------
@contextlib.contextmanager
def _stdout_to_log() -> Iterator[None]:
    """Send what torch's C++ exporter writes to file descriptor 1 to the debug log.

    The TorchScript exporter dumps its whole IR graph on stdout when it fails; the library
    must not print (DESIGN.md section 4), so the descriptor is redirected for the call.
    """
    fd = 1  # C++ writes to the process's descriptor 1, whatever sys.stdout is
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                _logger.debug("torch.onnx output:\n%s", text[:20000])


def _layers_calling(model: nn.Module, example: torch.Tensor, kind: str) -> list[str]:
    """Names of the modules whose own code emits the TorchScript op ``kind`` (deepest first)."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (example,), check_trace=False, strict=False)
    except Exception:  # noqa: BLE001 - best effort: the caller reports the op without a layer
        return []
    found: list[str] = []
    for name, sub in traced.named_modules():
        try:
            kinds = {node.kind().rstrip("_") for node in sub.graph.nodes()}
        except Exception:  # noqa: BLE001 - modules never called have no graph
            continue
        if kind.rstrip("_") in kinds:
            found.append(name)
    return found


def _failing_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """Name of the innermost module whose forward raises on ``example`` (None if none does)."""
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda *_, n=name: stack.append(n)))
        handles.append(module.register_forward_hook(lambda *_: stack.pop()))
    try:
        with torch.no_grad():
            model(example)
    except Exception:  # noqa: BLE001 - any failure: the stack says where it happened
        return stack[-1] if stack else None
    finally:
        for handle in handles:
            handle.remove()
    return None


def _describe_layers(model: nn.Module, names: list[str]) -> str:
    parts = []
    for name in names[:3]:
        module = model.get_submodule(name) if name else model
        parts.append(f"{name or '<top level>'} ({type(module).__name__})")
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(parts) + more


def _export_error(model: nn.Module, example: torch.Tensor, exc: Exception, opset: int) -> str:
    """One line naming the operator and the layer(s) that use it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.split(r"\s+(?:Please|\[Caused)", text)[0].rstrip(" .")
    kind = next((m.group(1) for p in _OP_PATTERNS if (m := p.search(str(exc)))), None)
    if kind is None:
        failing = _failing_layer(model, example)
        if failing is None:
            return f"cannot export to ONNX (opset {opset}): {type(exc).__name__}: {text}"
        shape = "x".join(str(d) for d in example.shape)
        return (
            f"cannot export to ONNX: the model fails on an input of shape {shape} in layer "
            f"{_describe_layers(model, [failing])}: {type(exc).__name__}: {text}"
        )
    kind = kind if "::" in kind else f"aten::{kind}"
    names = _layers_calling(model, example, kind)
    where = f"layer {_describe_layers(model, names)}" if names else "a layer of the model"
    where = where.replace(", ", " or ") if len(names) > 1 else where
    return (
        f"cannot export to ONNX: {where} uses operator {kind}, which the ONNX exporter cannot "
        f"convert at opset {opset} ({text}); try another input size or opset "
        f"({MIN_OPSET}..{MAX_OPSET}), or replace that layer"
    )


def _torch_export(
    model: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool, weights: str
) -> Any:
    """Run the TorchScript exporter into memory and parse the result with ``onnx``."""
    import onnx

    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    # The packed rewrite looks converted weights up by parameter name: PRESERVE keeps the
    # exporter from fusing any BatchNorm left unfolded into them (the model is in eval mode).
    training = (
        torch.onnx.TrainingMode.PRESERVE if weights == "packed" else torch.onnx.TrainingMode.EVAL
    )
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), _stdout_to_log():
            warnings.simplefilter("always")
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                export_params=True,
                opset_version=opset,
                do_constant_folding=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                training=training,
                keep_initializers_as_inputs=False,
            )
    except Exception as exc:
        raise ExportError(_export_error(model, example, exc, opset)) from exc
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer:
        _logger.debug(
            "%d tracer warnings during export (first: %s); the graph is valid for inputs of "
            "shape %s",
            len(tracer),
            tracer[0].message,
            tuple(example.shape),
        )
    return onnx.load_from_string(buffer.getvalue())


# --- ONNX side: the packed rewrite ----------------------------------------------------------
class _GraphBuilder:
    """Adds nodes and initializers to the packed graph; shared constants are added once."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._constants: dict[str, str] = {}

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

    def unpack(self, layer: _PackedLayer, output: str) -> None:
        """The subgraph that rebuilds ``layer.weight`` into tensor ``output``."""
        from onnx import TensorProto

        h, cin, kh, kw = layer.latent_shape
        k = layer.mfilter.shape[0]
        numel = h * cin * kh * kw
        p = f"{output}.unpack"
        signs = self.tensor(f"{output}.signs", layer.signs.astype(np.uint8))
        mfilter = self.tensor(
            f"{output}.mfilter",
            layer.mfilter.astype(np.float32).reshape(1, k, 1, *layer.mfilter.shape[1:]),
        )
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
        sign = self.node("Sub", [doubled, one_f], f"{p}.sign")
        modulated = self.node("Mul", [sign, mfilter], f"{p}.modulated")
        out_shape = self.shape([h * k, cin, kh, kw])
        if layer.scale is None:
            self.node("Reshape", [modulated, out_shape], output)
            return
        q = self.node("Reshape", [modulated, out_shape], f"{p}.q")
        scale = self.tensor(f"{output}.scale", layer.scale.reshape(-1, 1, 1, 1))
        self.node("Mul", [q, scale], output)


def _inline_initializer_aliases(graph: Any) -> None:
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


def _pack_graph(proto: Any, layers: list[_PackedLayer], opset: int) -> list[str]:
    """Replace each converted conv's float weight initializer by bits + M + unpack subgraph.

    Returns the names of the packed layers. A layer whose weight does not reach a ``Conv``
    weight input unchanged raises `ExportError` naming it.
    """
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, index))
    conv_weights: dict[str, np.ndarray] = {}
    for name, init in initializers.items():
        if uses.get(name) and all(use == ("Conv", 1) for use in uses[name]):
            conv_weights[name] = numpy_helper.to_array(init)
    by_value: dict[tuple[Any, ...], list[str]] = {}  # built on first need (hashing costs)

    builder = _GraphBuilder(opset)
    replaced: set[str] = set()
    packed: list[str] = []
    for layer in layers:
        target = f"{layer.name}.weight"
        if target not in conv_weights or not np.array_equal(conv_weights[target], layer.weight):
            if not by_value:
                for name, array in conv_weights.items():
                    by_value.setdefault(_array_key(array), []).append(name)
            candidates = by_value.get(_array_key(layer.weight), [])
            target = next(
                (n for n in candidates if np.array_equal(conv_weights[n], layer.weight)), ""
            )
        if not target:
            raise ExportError(
                f"cannot pack layer {layer.name}: its weight does not reach an ONNX Conv "
                "unchanged (the model reads it outside the conv, or the layer is never called "
                "in forward); export with --weights folded"
            )
        packed.append(layer.name)
        if target in replaced:  # the exporter merged identical weights: already rebuilt
            continue
        replaced.add(target)
        builder.unpack(layer, target)

    kept = [init for init in graph.initializer if init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + builder.initializers)
    nodes = builder.nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph_inputs = [i for i in graph.input if i.name not in replaced]
    del graph.input[:]
    graph.input.extend(graph_inputs)
    return packed


# --- entry points ---------------------------------------------------------------------------
def onnx_model(
    model: nn.Module,
    *,
    weights: str = "packed",
    opset: int = DEFAULT_OPSET,
    input_size: int | Sequence[int] | None = None,
    dynamic_batch: bool = False,
) -> tuple[Any, OnnxExportResult]:
    """The checked ``onnx.ModelProto`` of ``model`` and a description (path and bytes unset).

    See the module docstring for the layouts; `export_onnx` writes it to a file.
    """
    import onnx

    _check_options(weights, opset)
    shape = resolve_input_shape(model, input_size)
    prepared = _prepare(model, weights)
    if weights == "packed" and not prepared.layers:
        _logger.warning("the model has no MCConv2d layers: nothing to pack, all weights float")
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    proto = _torch_export(prepared.model, example, opset, dynamic_batch, weights)
    _inline_initializer_aliases(proto.graph)
    packed: list[str] = []
    if weights == "packed":
        packed = _pack_graph(proto, prepared.layers, opset)
    foreign = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"the exported graph uses non-standard ONNX domains: {foreign}")
    for key, value in (("mcn_compress.weights", weights), ("mcn_compress.planes", _planes(model))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    size = proto.ByteSize()
    if size > _MAX_PROTO_BYTES:
        raise ExportError(
            f"the ONNX model would be {size:,} bytes, over protobuf's 2 GiB limit for one file"
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the exported ONNX model fails onnx.checker: {first}") from exc
    result = OnnxExportResult(
        path=Path(),
        weights=weights,
        opset=opset,
        input_shape=(1, *shape),
        dynamic_batch=dynamic_batch,
        bytes=size,
        packed_layers=tuple(packed),
        folded_batchnorms=tuple(prepared.folded_batchnorms.values()),
        sign_bytes=sum(layer.signs.size for layer in prepared.layers),
    )
    return proto, result


def _planes(model: nn.Module) -> str:
    ks = sorted({m.planes for m in model.modules() if isinstance(m, MCConv2d)})
    return ",".join(str(k) for k in ks)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    weights: str = "packed",
    opset: int = DEFAULT_OPSET,
    input_size: int | Sequence[int] | None = None,
    dynamic_batch: bool = False,
) -> OnnxExportResult:
    """Write ``model`` as an ONNX file that onnxruntime runs without custom operators.

    Args:
        model: an MCN model (from `convert` or `load`); it is not modified.
        path: output file, written atomically.
        weights: ``"packed"`` (sign bits as uint8, unpacked in the graph) or ``"folded"``
            (float Conv weights Q); see the module docstring and DESIGN.md section 4.
        opset: ONNX opset, ``MIN_OPSET``..``MAX_OPSET`` (BitwiseAnd from 18, Mod below).
        input_size: S, (H, W) or (C, H, W) of one input; default from the model (224).
        dynamic_batch: make the batch dimension of input and output symbolic.

    Raises:
        ConfigError: an option is out of range.
        ExportError: a layer or operator cannot be exported (the message names it).

    Example:
        >>> export_onnx(load("model.pt"), "model.onnx", weights="packed").bytes
    """
    proto, result = onnx_model(
        model, weights=weights, opset=opset, input_size=input_size, dynamic_batch=dynamic_batch
    )
    payload = proto.SerializeToString()
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))
    _logger.info("wrote %s (%d bytes, %s weights, opset %d)", path, len(payload), weights, opset)
    return dataclasses.replace(result, path=Path(path), bytes=len(payload))


__all__ = [
    "DEFAULT_OPSET",
    "MAX_OPSET",
    "MIN_OPSET",
    "WEIGHT_LAYOUTS",
    "OnnxExportResult",
    "export_onnx",
    "fold_batchnorms",
    "onnx_model",
    "resolve_input_shape",
]
