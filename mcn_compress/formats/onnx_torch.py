"""The call into torch's ONNX exporters, and one-line errors that name the failing layer.

Two exporters (docs/design.md section 4, "Exporter"):

- ``dynamo`` (first choice): ``torch.onnx.export(..., dynamo=True)``, built on ``torch.export``
  and ``onnxscript``; the graph is optimised (constant folding, inlined functions) and the
  exporter's per-node debug metadata (stack traces, FX nodes) is dropped, so the file holds the
  model only. Parameter names stay the initializer names.
- ``torchscript`` (fallback): the legacy TorchScript-based exporter that torch deprecates. With
  ``exporter="auto"`` it runs only when the dynamo exporter cannot take a model, with one
  ``INFO`` log line that says why; its errors name the operator and the layer that uses it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mcn_compress.errors import ExportError, first_line

_logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 11  # BitShift
MAX_OPSET = 20  # the TorchScript exporter's maximum (the fallback must be able to run)
EXPORTERS = ("auto", "dynamo", "torchscript")
INPUT_NAME = "input"
OUTPUT_NAME = "output"
_OP_PATTERNS = (  # how the TorchScript exporter names the operator it failed on
    re.compile(r"operator '((?:aten|prim|quantized)::\w+)'"),
    re.compile(r"ONNX export of operator (\w+)"),
    re.compile(r"\b((?:aten|prim|quantized)::\w+)"),
)


@contextlib.contextmanager
def _stdout_to_log() -> Iterator[None]:
    """Send what torch's C++ exporter writes to file descriptor 1 to the debug log.

    The TorchScript exporter dumps its whole IR graph on stdout when it fails; the library
    must not print (docs/design.md section 4), so the descriptor is redirected for the call.
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


_TORCH_LOGGERS = ("torch.export", "torch._export", "torch._dynamo", "torch.onnx", "onnxscript")


@contextlib.contextmanager
def _quiet_torch_loggers() -> Iterator[None]:
    """Keep torch.export's own error log lines off stderr: a failure becomes one ExportError."""
    loggers = [logging.getLogger(name) for name in _TORCH_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


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
    text = first_line(exc)
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


def torch_export(
    model: nn.Module,
    example: torch.Tensor,
    opset: int,
    dynamic_batch: bool,
    weights: str,
    exporter: str = "auto",
) -> tuple[Any, str]:
    """Export ``model`` (eval mode) on ``example``: an in-memory ``onnx.ModelProto`` and the
    exporter that made it (``"dynamo"`` or ``"torchscript"``).

    ``exporter``: ``"dynamo"``, ``"torchscript"`` or ``"auto"`` (dynamo, and the TorchScript
    exporter when dynamo fails, with a log line); see the module docstring. The caller checks
    it (`mcn_compress.formats.onnx` raises `ConfigError` for any other value).
    """
    if exporter != "torchscript":
        try:
            return _dynamo_export(model, example, opset, dynamic_batch), "dynamo"
        except Exception as exc:
            if exporter == "dynamo":
                raise ExportError(
                    f"the torch.export-based ONNX exporter cannot export the model: "
                    f"{type(exc).__name__}: {first_line(exc)}"
                ) from exc
            _logger.info(
                "the torch.export-based ONNX exporter cannot take this model (%s: %s); "
                "using the TorchScript exporter instead",
                type(exc).__name__,
                first_line(exc)[:300],
            )
    return _torchscript_export(model, example, opset, dynamic_batch, weights), "torchscript"


def _dynamo_export(model: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool) -> Any:
    """``torch.onnx.export(..., dynamo=True)``, optimised, without the debug metadata."""
    dynamic_shapes = ({0: "batch"},) if dynamic_batch else None
    quiet = _quiet_torch_loggers()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), _stdout_to_log(), quiet:
        warnings.simplefilter("always")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
            report=False,
        )
    for warning in caught:
        _logger.debug(
            "torch.onnx (dynamo) warning: %s: %s", warning.category.__name__, warning.message
        )
    if program is None:  # pragma: no cover - torch returns the program when no file is given
        raise ExportError("the ONNX exporter returned no program")
    proto = program.model_proto
    got = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if got != {opset}:  # the exporter keeps its own opset when the version converter fails
        raise ExportError(f"the graph came out at opset {sorted(got)}, not {opset}")
    _drop_debug_metadata(proto)
    return proto


def _drop_debug_metadata(proto: Any) -> None:
    """Remove the dynamo exporter's per-value and per-node metadata (it can double the file)."""
    graph = proto.graph
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del value.metadata_props[:]
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.metadata_props[:]
    del proto.metadata_props[:]
    graph.doc_string = ""
    proto.doc_string = ""


def _torchscript_export(
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
