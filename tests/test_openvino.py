"""The packed ONNX files run in a second stock runtime: OpenVINO's CPU plugin at f32 precision
(docs/design.md section 4.8). Skipped when ``openvino`` is not installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_helpers import rel_norm
from torch import nn

from mcn_compress import MCNConfig, convert, export_onnx, load_float_model

ov = pytest.importorskip("openvino")

REL_TOL = 1e-4


def openvino_run(path: Path, x: torch.Tensor) -> np.ndarray:
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(x.numpy())[0])


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    keep = convert(load_float_model("resnet18", pretrained=False), MCNConfig(planes=4))
    torch.manual_seed(1)
    expand = convert(
        load_float_model("test_resnet", pretrained=False), MCNConfig(planes=2, width="expand")
    )
    return {"resnet18-k4": keep.eval(), "test_resnet-expand-k2": expand.eval()}


@pytest.mark.parametrize("compute", ["dense", "factored"])
@pytest.mark.parametrize("name", ["resnet18-k4", "test_resnet-expand-k2"])
def test_packed_onnx_runs_in_openvino_at_f32(
    name: str, compute: str, models: dict[str, nn.Module], tmp_path: Path
) -> None:
    model = models[name]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x).numpy()
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(
        model, path, weights="packed", compute=compute, input_size=64, dynamic_batch=True
    )
    if compute == "factored":
        assert result.factored_layers  # the factored graph, not a dense one under its name
    error = rel_norm(openvino_run(path, x), want)
    assert error <= REL_TOL, f"{name} {compute}: relative error {error:.2e} in OpenVINO"


def test_w1a8_onnx_runs_in_openvino_with_int8_convolutions(
    models: dict[str, nn.Module], tmp_path: Path
) -> None:
    """The W1A8 file (docs/design.md section 4.10), factored forms included, runs on
    OpenVINO's int8 kernels: every convolution and the classifier at u8 runtime precision,
    outputs within int8 rounding of onnxruntime's."""
    import onnxruntime as ort

    model = models["resnet18-k4"]
    generator = torch.Generator().manual_seed(4)
    images = [torch.randn(4, 3, 64, 64, generator=generator) for _ in range(4)]
    path = tmp_path / "w1a8.onnx"
    result = export_onnx(
        model,
        path,
        activations="int8",
        calibration=images,
        input_size=64,
        threads=1,
        compute="factored",
    )
    assert result.factored_layers
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1})
    precisions = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in ("Convolution", "GroupConvolution", "FullyConnected"):
            precisions[op.get_friendly_name()] = info["runtimePrecision"].astype(str)
    assert precisions and set(precisions.values()) <= {"u8", "i8"}, precisions
    x = torch.randn(1, 3, 64, 64, generator=generator)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert rel_norm(np.asarray(compiled(x.numpy())[0]), want) <= 0.03
