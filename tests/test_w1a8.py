"""ONNX with int8 activations (W1A8, docs/design.md section 4.10): the int8-friendly forms
compute the MCN layer, the int8 weights of the converted convs are the naive per-channel
quantization of their weights yet rebuilt from the packed sign bits, the int8 rule, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_helpers import rel_norm
from torch import nn
from typer.testing import CliRunner

from mcn_compress import MCNConfig, convert, export_onnx, load_float_model, save
from mcn_compress.cli import app
from mcn_compress.errors import DataError
from mcn_compress.formats.onnx_w1a8 import int8_ready_graph
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.planner import Compute, Form, Geometry, Tunables, int8_rule

ort = pytest.importorskip("onnxruntime")

SIZE = 32


@pytest.fixture(scope="module")
def mcn() -> nn.Module:
    torch.manual_seed(0)
    model = load_float_model("resnet18", pretrained=False, num_classes=10)
    with torch.no_grad():  # BatchNorm statistics that differ per channel, as after training
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return convert(model, MCNConfig(planes=4)).eval()


def _forced_forms(model: nn.Module) -> dict[str, Form]:
    """Every 1x1 layer ``scale``, every stride-1 3x3 ``grid``; the rest dense."""
    forms = {}
    for name, module in model.named_modules():
        if isinstance(module, MCConv2d):
            if module.kernel_size == (1, 1):
                forms[name] = Form.SCALE
            elif module.stride == (1, 1):
                forms[name] = Form.GRID
            else:
                forms[name] = Form.DENSE
    return forms


def _images(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, SIZE, SIZE, generator=generator) for _ in range(count // 4)]


def _run(proto_or_path: object, x: torch.Tensor, level: object = None) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if level is not None:
        options.graph_optimization_level = level
    source = proto_or_path
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_int8_rule_factors_wide_layers_and_raises_the_bar_with_threads() -> None:
    def geo(cin: int, kernel: int, stride: int = 1) -> Geometry:
        pad = kernel // 2
        return Geometry(
            cin,
            cin,
            (kernel, kernel),
            (stride, stride),
            (1, 1),
            (pad, pad, pad, pad),
            1,
            4,
            kernel > 1,
            (14, 14),
        )

    tunables = Tunables(int8_scale_min_cin=64, int8_grid_min_cin=128)
    assert int8_rule(geo(64, 1), 1, tunables) is Form.SCALE
    assert int8_rule(geo(64, 1), 2, tunables) is Form.DENSE  # 128 input channels needed
    assert int8_rule(geo(128, 3), 1, tunables) is Form.GRID
    assert int8_rule(geo(128, 3), 2, tunables) is Form.DENSE
    assert int8_rule(geo(512, 3), 2, tunables) is Form.GRID
    assert int8_rule(geo(512, 3, stride=2), 1, tunables) is Form.DENSE  # no strided grid


def test_int8_forms_compute_the_mcn_layers_exactly_in_float(mcn: nn.Module) -> None:
    """Step 1 alone (no quantization): the scale and grid graphs equal the PyTorch model."""
    forms = _forced_forms(mcn)
    ready = int8_ready_graph(
        mcn,
        (3, SIZE, SIZE),
        opset=18,
        dynamic_batch=True,
        exporter="auto",
        threads=1,
        compute=Compute.AUTO,
        forms=forms,
    )
    factored = {row.name: row.form for row in ready.plan.layers if row.form is not Form.DENSE}
    assert Form.SCALE in factored.values() and Form.GRID in factored.values()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = mcn(x).numpy()
    assert rel_norm(_run(ready.proto, x), want) <= 1e-4


def _batchnorm_after(model: nn.Module, conv: str) -> nn.BatchNorm2d:
    """The BatchNorm that follows ``conv`` in a timm ResNet block."""
    parent, _, leaf = conv.rpartition(".")
    bn_name = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "0": "1"}[leaf]
    module = model.get_submodule(f"{parent}.{bn_name}")
    assert isinstance(module, nn.BatchNorm2d)
    return module


def _folded_initializers(path: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """The constants onnxruntime holds after folding the graph at session creation."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    folded = onnx.load(tmp_path / "folded.onnx")
    return {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}


def test_int8_weights_are_naive_per_channel_quantization_rebuilt_from_sign_bits(
    mcn: nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "w1a8.onnx"
    forms = _forced_forms(mcn)
    export_onnx(
        mcn,
        path,
        activations="int8",
        calibration=_images(16),
        compute="auto",
        input_size=SIZE,
        threads=1,
        forms=forms,
    )
    stored = onnx.load(path)
    stored_int8 = [i for i in stored.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    layers = {n: m for n, m in mcn.named_modules() if isinstance(m, MCConv2d)}
    for name, layer in layers.items():
        # the file keeps the sign bits, not an int8 copy of the converted weights
        assert any(i.name == f"{name}.w1a8.signs" for i in stored.graph.initializer)
        dims = (layer.out_channels, layer.in_channels, *layer.kernel_size)
        assert not any(tuple(i.dims) == dims for i in stored_int8), name
    folded = _folded_initializers(path, tmp_path)
    for name, layer in layers.items():
        signs = torch.where(layer.weight >= 0, 1.0, -1.0)  # B = sign(C), sign(0) = +1
        if forms[name] is Form.DENSE:
            bn = _batchnorm_after(mcn, name)  # folded: W * gamma / sqrt(var + eps)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            q_float = layer.to_conv2d().weight.detach() * scale.reshape(-1, 1, 1, 1)
            step = q_float.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
            want = torch.round(q_float / step).to(torch.int8).numpy()
            source = next(n for n in folded if n.startswith(f"{name}.weight_quantized"))
        else:  # the ±1 filters, stored as ±1 (scale 1)
            h, cin, kh, kw = signs.shape
            if forms[name] is Form.GRID:
                signs = signs.reshape(h, cin, kh * kw).permute(2, 0, 1).reshape(-1, cin, 1, 1)
            want = signs.to(torch.int8).numpy()
            source = f"{name}.w1a8.binary_quantized"
        got = folded[source]
        assert np.array_equal(got, want), name


@pytest.mark.parametrize("compute", ["dense", "auto"])
def test_w1a8_outputs_follow_the_mcn_model(mcn: nn.Module, compute: str, tmp_path: Path) -> None:
    path = tmp_path / "w1a8.onnx"
    forms = _forced_forms(mcn) if compute == "auto" else None
    result = export_onnx(
        mcn,
        path,
        activations="int8",
        calibration=_images(32),
        compute=compute,
        input_size=SIZE,
        dynamic_batch=True,
        forms=forms,
    )
    onnx.checker.check_model(str(path), full_check=True)
    assert result.activations == "int8" and result.calibration_images == 32
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["mcn_compress.activations"] == "int8"
    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = mcn(x).numpy()
    assert rel_norm(_run(path, x), want) <= 0.03  # int8 activations: 1.0-1.4% measured


def test_w1a8_refuses_images_of_another_size(mcn: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="input size"):
        export_onnx(
            mcn,
            tmp_path / "x.onnx",
            activations="int8",
            input_size=SIZE,
            calibration=[torch.randn(2, 3, 16, 16)],
        )
    assert not (tmp_path / "x.onnx").exists()


def test_cli_exports_w1a8_and_refuses_options_that_do_not_fit(
    mcn: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    save(mcn, "m.pt")
    runner = CliRunner()
    args = ["export", "m.pt", "-f", "onnx", "--input-size", str(SIZE), "--activations", "int8"]
    done = runner.invoke(
        app,
        [
            *args,
            "--calibrate-data",
            "synthetic",
            "--calibrate-images",
            "8",
            "-o",
            "q.onnx",
            "--json",
        ],
    )
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["activations"] == "int8" and report["calibration_images"] == 8
    for extra, message in (
        ([], "needs --calibrate-data"),
        (["--calibrate-data", "synthetic", "--weights", "folded"], "drop --weights"),
        (["--calibrate-data", str(tmp_path / "empty")], "no image"),
    ):
        (tmp_path / "empty").mkdir(exist_ok=True)
        failed = runner.invoke(app, [*args, *extra, "-o", "bad.onnx"])
        assert failed.exit_code == 1, failed.output
        assert message in failed.output and "Traceback" not in failed.output
        assert not Path("bad.onnx").exists()
    packed = runner.invoke(app, ["export", "m.pt", "--activations", "int8", "-o", "x.mcn"])
    assert packed.exit_code == 1 and "--format onnx only" in packed.output
