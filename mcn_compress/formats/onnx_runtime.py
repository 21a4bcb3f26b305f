"""Read an exported ONNX classifier back: its metadata, and onnxruntime as an `nn.Module`.

`read_onnx_info` reads the file's size, input shape and ``mcn_compress.*`` metadata (the
layout, compute, activations, threads and the stored model description that `export_onnx`
writes; docs/design.md section 4.4) without running it. `OnnxClassifier` wraps an
onnxruntime session as an eval-only `nn.Module`, so `evaluate.accuracy` measures an ONNX file
exactly as it measures a PyTorch model; the data pipeline takes its input size, channel count
and normalisation from the rebuilt float architecture of the stored description (offline,
random weights), else from the graph's input with ImageNet statistics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mcn_compress.errors import CheckpointError, ModelLoadError, first_line
from mcn_compress.info import ModelSource
from mcn_compress.limits import check_file

_logger = logging.getLogger(__name__)

MAX_ONNX_BYTES = 2**31 - 1  # protobuf's limit on one serialised message
SOURCE_KEY = "mcn_compress.model"  # JSON of the `ModelSource` the file was exported from
IMAGENET_CFG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
ORT_HINT = "pip install 'mcn-compress[onnx]'"


@dataclasses.dataclass(frozen=True)
class OnnxInfo:
    """What an ONNX file says about itself: bytes, input shape (batch ``None`` when
    symbolic), outputs, and its ``mcn_compress.*`` metadata (empty for foreign files)."""

    path: Path
    bytes: int
    input_name: str
    input_shape: tuple[int | None, int, int, int]
    outputs: int | None
    metadata: dict[str, str]

    @property
    def source(self) -> ModelSource | None:
        """The stored model description, when the file has a valid one."""
        text = self.metadata.get(SOURCE_KEY)
        if not text:
            return None
        try:
            return ModelSource.from_dict(json.loads(text))
        except (ValueError, ModelLoadError, TypeError) as exc:
            _logger.warning("%s: stored model description not used: %s", self.path, exc)
            return None

    def meta(self, key: str) -> str | None:
        return self.metadata.get(f"mcn_compress.{key}")


def _dims(value_info: Any) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def read_onnx_info(path: str | Path) -> OnnxInfo:
    """The `OnnxInfo` of an ONNX classifier file (one NCHW input, one logits output).

    Raises:
        CheckpointError: not a regular file, over protobuf's 2 GiB, not ONNX, or not an image
            classifier with one 4-D input of fixed channels and size.
    """
    import onnx

    path = check_file(path, CheckpointError, "ONNX file ")
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise CheckpointError(f"{path} is {size:,} bytes, over ONNX's 2 GiB limit for one file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable ONNX file: {first_line(exc)}") from exc
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(_dims(inputs[0])) != 4 or None in _dims(inputs[0])[1:]:
        raise CheckpointError(
            f"{path}: expected an image classifier with one NCHW input of fixed size"
        )
    batch, channels, height, width = _dims(inputs[0])
    assert channels is not None and height is not None and width is not None
    out = _dims(proto.graph.output[0]) if proto.graph.output else []
    return OnnxInfo(
        path=path,
        bytes=size,
        input_name=inputs[0].name,
        input_shape=(batch, channels, height, width),
        outputs=out[-1] if out else None,
        metadata={p.key: p.value for p in proto.metadata_props},
    )


class OnnxClassifier(nn.Module):
    """An ONNX classifier run by onnxruntime (CPU), called like a PyTorch model.

    ``pretrained_cfg`` (input size, mean, std) and ``num_classes`` describe its input and
    output for the data pipeline. A file with a fixed batch of 1 is run image by image.
    """

    def __init__(self, info: OnnxInfo, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError(f"running an ONNX file needs onnxruntime: {ORT_HINT}") from exc
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(info.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {info.path}: {first_line(exc)}") from exc
        self.info = info
        self.batch = info.input_shape[0]
        if info.outputs is not None:
            self.num_classes = info.outputs
        _, channels, height, width = info.input_shape
        self.pretrained_cfg = {"input_size": (channels, height, width), **IMAGENET_CFG}
        source = info.source
        if source is not None:
            from mcn_compress.models import rebuild_model

            try:
                cfg = getattr(rebuild_model(source), "pretrained_cfg", None)
            except ModelLoadError as exc:
                _logger.warning("%s: normalisation of ImageNet used (%s)", info.path, exc)
                cfg = None
            if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg:
                self.pretrained_cfg |= {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().float().numpy()
        step = self.batch or len(array)
        parts = [
            self.session.run(None, {self.info.input_name: array[i : i + step]})[0]
            for i in range(0, len(array), step)
        ]
        return torch.from_numpy(np.concatenate(parts))


__all__ = ["SOURCE_KEY", "OnnxClassifier", "OnnxInfo", "read_onnx_info"]
