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
