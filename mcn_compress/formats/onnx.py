"""ONNX export of MCN models that a stock ONNX runtime runs (docs/design.md section 4, ``export``).

Two weight layouts, both plain ONNX in the default domain (no custom operators):

- ``folded``: every `MCConv2d` becomes an ordinary ``Conv`` whose float initializer is the
  reconstructed filter ``Q[h*K + j, c] = B[h, c] * M[j]`` (docs/design.md section 2). Runs anywhere.
- ``packed`` (default): the sign bits B are stored as a uint8 initializer in the bit order of
  `mcn_compress.formats.packed.pack_signs` (element ``i`` of the row-major latent shape
  ``(out // K, in // groups, kh, kw)`` is bit ``i % 8`` of byte ``i // 8``, least significant
  first, 1 = +1) next to M, and a small subgraph of standard operators rebuilds the weight in the
  graph and feeds it to the same ``Conv``::

      bytes --Reshape(-1, 1)--> BitShift(RIGHT, [0..7]) --> BitwiseAnd 1 (opset >= 18) or Mod 2
            --Reshape(-1)--> [Slice to numel] --Reshape(h, 1, c, kh, kw)--> Cast(float)
            --> *2 - 1 (B) --> * M (1, K, 1, kh|1, kw|1) --Reshape(out, c, kh, kw)--> [* s] --> Conv

  Every input of that subgraph is an initializer, so onnxruntime constant-folds it once when the
  session is created (graph optimisation level ``ORT_ENABLE_BASIC`` or higher; the default is
  ``ORT_ENABLE_ALL``); with optimisations disabled the unpacking would run on every inference.

BatchNorm (docs/design.md section 2, "Storage kept after training"): an eval-mode ``BatchNorm2d``
(or timm ``BatchNormAct2d``) that is the only consumer of a conv's output is folded into that
conv in PyTorch before export, in both layouts: ``s = gamma / sqrt(var + eps)``, weight ``W * s``
per output channel, bias ``(b - mean) * s + beta``. In the packed layout the scale stays a
separate ``(out, 1, 1, 1)`` initializer multiplied in the subgraph (``Q * s``, the same float
operation as the folded layout, so both give bit-identical weights), which keeps M at its
``(K, kh, kw)`` shape and costs one float per output channel instead of BatchNorm's four.
BatchNorms that do not directly follow a conv (e.g. DenseNet's pre-activation) stay
``BatchNormalization`` nodes.

Exporter (`mcn_compress.formats.onnx_torch`): torch's torch.export-based exporter
(``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``), optimised and stripped of
its debug metadata; parameter names stay the initializer names, which is how the packed rewrite
finds each converted conv's weight (checked by value, too). A model that exporter cannot take
(or an opset its version converter cannot reach) goes through the deprecated TorchScript
exporter instead, with a log line; ``exporter=`` forces either.
Numbers and files only: nothing here prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcn_compress.defaults import WEIGHT_LAYOUTS
from mcn_compress.errors import ConfigError, ExportError, first_line
from mcn_compress.formats.atomic import atomic_write
from mcn_compress.formats.onnx_factored import factor_graph
from mcn_compress.formats.onnx_int8 import (
    METADATA_KEY,
    check_onnx_float_layers,
    float_layer_weights,
    store_float_layers,
)
from mcn_compress.formats.onnx_packing import inline_initializer_aliases, pack_graph
from mcn_compress.formats.onnx_prepare import prepare_for_onnx
from mcn_compress.formats.onnx_runtime import SOURCE_KEY
from mcn_compress.formats.onnx_torch import (
    DEFAULT_OPSET,
    EXPORTERS,
    MAX_OPSET,
    MIN_OPSET,
    torch_export,
)
from mcn_compress.formats.onnx_w1a8 import ACTIVATIONS, DEFAULT_CALIBRATION_IMAGES, w1a8_model
from mcn_compress.info import info_of
from mcn_compress.module_utils import input_sizes, resolve_input_shape
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.fold_bn import fold_batchnorms
from mcn_compress.passes.planner import (
    DEFAULT_TUNABLES,
    Compute,
    Form,
    InferencePlan,
    Tunables,
    default_threads,
    enum_value,
)

_logger = logging.getLogger(__name__)

COMPUTE_MODES = (Compute.DENSE.value, Compute.FACTORED.value, Compute.AUTO.value)
_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit on one serialised message


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
    compute: str = "dense"
    factored_layers: tuple[str, ...] = ()
    exporter: str = "dynamo"  # the torch exporter that made the graph (onnx_torch.EXPORTERS)
    float_layers: str = "float32"  # how float layer weights are stored (design.md 4.9)
    float_layer_weights: int = 0  # initializers stored as float16 or int8
    plan: InferencePlan | None = None  # the factored-compute plan (compute other than dense)
    activations: str = "float32"  # "int8": a QDQ graph (docs/design.md section 4.10)
    calibration_images: int = 0  # images the int8 activation ranges came from
    bit_layers: tuple[str, ...] = ()  # int8: layers whose int8 weights are rebuilt from bits

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.path),
            "weights": self.weights,
            "compute": self.compute,
            "exporter": self.exporter,
            "factored_layers": len(self.factored_layers),
            "opset": self.opset,
            "input_shape": list(self.input_shape),
            "dynamic_batch": self.dynamic_batch,
            "bytes": self.bytes,
            "packed_layers": len(self.packed_layers),
            "folded_batchnorms": len(self.folded_batchnorms),
            "sign_bytes": self.sign_bytes,
            "float_layers": self.float_layers,
            "float_layer_weights": self.float_layer_weights,
            "threads": self.plan.threads if self.plan is not None else None,
            "activations": self.activations,
            "calibration_images": self.calibration_images,
        }


# --- options --------------------------------------------------------------------------------
def _check_options(
    weights: str, opset: int, compute: str = "dense", exporter: str = "auto", threads: int = 1
) -> None:
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if weights not in WEIGHT_LAYOUTS:
        raise ConfigError(f"weights must be one of {', '.join(WEIGHT_LAYOUTS)}, got {weights!r}")
    if compute not in COMPUTE_MODES:
        raise ConfigError(f"compute must be one of {', '.join(COMPUTE_MODES)}, got {compute!r}")
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if compute != "dense" and weights != "packed":
        raise ConfigError(f"compute {compute!r} needs weights 'packed' (the sign bits)")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(
            f"opset {opset} is out of range: use {MIN_OPSET}..{MAX_OPSET} "
            f"(BitShift needs {MIN_OPSET}; the TorchScript exporter stops at {MAX_OPSET})"
        )


# --- torch.onnx.export ----------------------------------------------------------------------


# --- ONNX side: the packed rewrite ----------------------------------------------------------


# --- entry points ---------------------------------------------------------------------------
def onnx_model(
    model: nn.Module,
    *,
    weights: str = "packed",
    opset: int = DEFAULT_OPSET,
    input_size: int | Sequence[int] | None = None,
    dynamic_batch: bool = False,
    compute: Compute | str = Compute.DENSE,
    exporter: str = "auto",
    float_layers: str = "float32",
    threads: int | None = None,
    tunables: Tunables = DEFAULT_TUNABLES,
    forms: Mapping[str, Form | str] | None = None,
    activations: str = "float32",
    calibration: Iterable[object] | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
) -> tuple[Any, OnnxExportResult]:
    """The checked ``onnx.ModelProto`` of ``model`` and a description (path and bytes unset).

    See the module docstring for the layouts and `export_onnx` for the options; `export_onnx`
    writes it to a file. ``tunables``: the planner's thresholds
    (`mcn_compress.passes.planner.Tunables`); ``forms``: converted layer name -> the form it
    must run in (``dense``, ``scale``, ``cols``, ``grid``), instead of the planner's choice.
    ``activations="int8"``: the QDQ graph of `mcn_compress.formats.onnx_w1a8`, its activation
    ranges from at most ``calibration_images`` images of ``calibration``.
    """

    compute = enum_value(Compute, compute, "compute")
    threads = default_threads() if threads is None else threads
    _check_options(weights, opset, compute.value, exporter, threads)
    check_onnx_float_layers(float_layers, opset)
    shape = resolve_input_shape(model, input_size)
    form_overrides = {k: enum_value(Form, v, "form") for k, v in (forms or {}).items()}
    if activations not in ACTIVATIONS:
        raise ConfigError(
            f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}"
        )
    if activations == "int8":
        if weights != "packed" or float_layers != "float32":
            raise ConfigError(
                "int8 activations store the sign bits and quantize every layer themselves: "
                "leave weights packed and float_layers float32"
            )
        if calibration is None:
            raise ConfigError("int8 activations need calibration images (calibration=...)")
        proto, graph, ready = w1a8_model(
            model,
            calibration,
            shape,
            opset=opset,
            dynamic_batch=dynamic_batch,
            exporter=exporter,
            threads=threads,
            compute=compute,
            tunables=tunables,
            forms=form_overrides,
            max_images=calibration_images,
        )
        result = OnnxExportResult(
            path=Path(),
            weights=weights,
            opset=opset,
            input_shape=(1, *shape),
            dynamic_batch=dynamic_batch,
            bytes=0,
            packed_layers=graph.bit_layers,
            folded_batchnorms=tuple(ready.prepared.folded_batchnorms.values()),
            sign_bytes=sum(layer.signs.size for layer in ready.prepared.layers),
            compute=compute.value,
            factored_layers=graph.plan.factored,
            exporter=ready.exporter,
            float_layers="int8",
            plan=graph.plan,
            activations="int8",
            calibration_images=graph.calibration_images,
            bit_layers=graph.bit_layers,
        )
        return _finish(proto, model, result, threads)
    prepared = prepare_for_onnx(model, weights)
    if weights == "packed" and not prepared.layers:
        _logger.warning("the model has no MCConv2d layers: nothing to pack, all weights float")
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    proto, used = torch_export(prepared.model, example, opset, dynamic_batch, weights, exporter)
    inline_initializer_aliases(proto.graph)
    packed: list[str] = []
    factored: tuple[str, ...] = ()
    plan = None
    if weights == "packed":
        dense_layers = prepared.layers
        if compute is not Compute.DENSE:
            sizes = input_sizes(prepared.model, example, [layer.name for layer in dense_layers])
            dense_layers, plan = factor_graph(
                proto,
                dense_layers,
                compute,
                opset,
                threads,
                tunables=tunables,
                input_hw=sizes,
                input_shape=shape,
                forms=form_overrides,
            )
            factored = plan.factored
        packed = pack_graph(proto, dense_layers, opset) + list(factored)
    stored = store_float_layers(
        proto, float_layers, float_layer_weights(prepared.model, model), opset
    )
    result = OnnxExportResult(
        path=Path(),
        weights=weights,
        opset=opset,
        input_shape=(1, *shape),
        dynamic_batch=dynamic_batch,
        bytes=0,
        packed_layers=tuple(packed),
        folded_batchnorms=tuple(prepared.folded_batchnorms.values()),
        sign_bytes=sum(layer.signs.size for layer in prepared.layers),
        compute=compute.value,
        factored_layers=factored,
        exporter=used,
        float_layers=float_layers,
        float_layer_weights=len(stored),
        plan=plan,
    )
    return _finish(proto, model, result, threads)


def _finish(
    proto: Any, model: nn.Module, result: OnnxExportResult, threads: int
) -> tuple[Any, OnnxExportResult]:
    """``proto`` with its metadata, checked (standard domains, protobuf's size limit,
    ``onnx.checker``), and ``result`` with its size."""
    import onnx

    foreign = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"the exported graph uses non-standard ONNX domains: {foreign}")
    source = info_of(model).source
    for key, value in (
        ("mcn_compress.weights", result.weights),
        ("mcn_compress.planes", _planes(model)),
        ("mcn_compress.compute", result.compute),
        ("mcn_compress.threads", str(threads)),
        ("mcn_compress.exporter", result.exporter),
        (METADATA_KEY, result.float_layers),
        ("mcn_compress.activations", result.activations),
        (SOURCE_KEY, json.dumps(source.to_dict()) if source is not None else ""),
    ):
        if value:
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
        first = first_line(exc)
        raise ExportError(f"the exported ONNX model fails onnx.checker: {first}") from exc
    return proto, dataclasses.replace(result, bytes=size)


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
    compute: Compute | str = Compute.DENSE,
    exporter: str = "auto",
    float_layers: str = "float32",
    threads: int | None = None,
    activations: str = "float32",
    calibration: Iterable[object] | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    forms: Mapping[str, Form | str] | None = None,
) -> OnnxExportResult:
    """Write ``model`` as an ONNX file that onnxruntime runs without custom operators.

    Args:
        model: an MCN model (from `convert` or `load`); it is not modified.
        path: output file, written atomically.
        weights: ``"packed"`` (sign bits as uint8, unpacked in the graph) or ``"folded"``
            (float Conv weights Q); see the module docstring and docs/design.md section 4.
        opset: ONNX opset, ``MIN_OPSET``..``MAX_OPSET`` (BitwiseAnd from 18, Mod below).
        input_size: S, (H, W) or (C, H, W) of one input; default from the model (224).
        dynamic_batch: make the batch dimension of input and output symbolic.
        compute: ``"dense"`` (one ``Conv`` with the rebuilt Q per layer), ``"factored"`` (every
            converted conv in factored form: H = out / K binary filters and the M combination,
            K times fewer MACs; docs/design.md section 4.8, `mcn_compress.formats.onnx_factored`)
            or ``"auto"`` (factored where the planner, `mcn_compress.passes.planner`, expects it
            to be faster at ``threads``, per layer). Factored forms need ``weights="packed"``.
        exporter: ``"auto"`` (torch.export-based, the TorchScript exporter as a fallback
            with a log line), ``"dynamo"`` or ``"torchscript"``; see
            `mcn_compress.formats.onnx_torch`.
        float_layers: ``"float32"`` (default), ``"float16"`` (float16 initializer + ``Cast``)
            or ``"int8"`` (per-output-channel int8 + ``DequantizeLinear``, opset >= 13) for the
            weights of the layers that stay float (docs/design.md section 4.9,
            `mcn_compress.formats.onnx_int8`).
        threads: the onnxruntime intra-op threads the file will run with, for the choice of
            forms with ``compute="auto"`` (default: this machine's cores). The plan is in the
            result's ``plan`` and the file's metadata ``mcn_compress.threads``.
        activations: ``"float32"`` (default) or ``"int8"``: a QDQ graph with uint8
            activations and int8 weights that onnxruntime and OpenVINO run with their int8
            kernels, the converted layers' int8 weights still rebuilt from their sign bits
            and each converted conv in the int8 form the planner picks for ``threads``
            (docs/design.md section 4.10, `mcn_compress.formats.onnx_w1a8`). Needs
            ``calibration`` and ``weights="packed"``; every float layer becomes int8 too.
        calibration: unlabeled images for the int8 activation ranges: an iterable of
            batches (tensors or ``(images, ...)`` pairs, e.g.
            `mcn_compress.calibration_data.calibration_data`) at the export's input size.
        calibration_images: at most this many images of ``calibration`` are used.
        forms: converted layer name -> the form it must run in, instead of the planner's
            choice (`mcn_compress.passes.planner.Form`; int8: ``dense``, ``scale``, ``grid``).

    Raises:
        ConfigError: an option is out of range.
        ExportError: a layer or operator cannot be exported (the message names it).

    Example:
        >>> export_onnx(load("model.pt"), "model.onnx", weights="packed").bytes
    """
    proto, result = onnx_model(
        model,
        weights=weights,
        opset=opset,
        input_size=input_size,
        dynamic_batch=dynamic_batch,
        compute=compute,
        exporter=exporter,
        float_layers=float_layers,
        threads=threads,
        activations=activations,
        calibration=calibration,
        calibration_images=calibration_images,
        forms=forms,
    )
    payload = proto.SerializeToString()
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))
    _logger.info("wrote %s (%d bytes, %s weights, opset %d)", path, len(payload), weights, opset)
    return dataclasses.replace(result, path=Path(path), bytes=len(payload))


__all__ = [
    "COMPUTE_MODES",
    "DEFAULT_OPSET",
    "EXPORTERS",
    "MAX_OPSET",
    "MIN_OPSET",
    "WEIGHT_LAYOUTS",
    "OnnxExportResult",
    "export_onnx",
    "fold_batchnorms",
    "onnx_model",
    "resolve_input_shape",
]
