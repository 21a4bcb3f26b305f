"""Float layers at 16 or 8 bits (docs/design.md section 4.9): the quantizer, the packed file,
ONNX, the CLI and the sizes of issue 16.

References are written here: per-channel int8 with numpy (max |W_o| / 127, round half to even,
clamp), the theoretical minimum counted from the model's own state dict, float layers picked
by module type, outputs of the float32 export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from model_helpers import bare_convert
from onnx import numpy_helper
from onnx_helpers import ort_run, rel_norm
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from mcn_compress import (
    ConfigError,
    MCNConfig,
    export_onnx,
    export_packed,
    info_of,
    load,
    load_float_model,
)
from mcn_compress.cli import app
from mcn_compress.formats.quantize import dequantize_int8, quantize_int8
from mcn_compress.nn.mcconv import MCConv2d

pytest.importorskip("onnxruntime")

SLACK = 16 * 1024
MB = 1_100_000  # the "1.1 MB" in decimal bytes (10^6), the stricter reading of "MB"


# --------------------------------------------------------------------------------------------
# helpers and naive references
# --------------------------------------------------------------------------------------------
def naive_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (axis 0): scale = max|W_o| / 127 (1 for a zero row), round, clamp."""
    rows = weight.reshape(weight.shape[0], -1).astype(np.float32)
    q = np.zeros(rows.shape, dtype=np.int8)
    scales = np.ones(rows.shape[0], dtype=np.float32)
    for o, row in enumerate(rows):
        peak = np.float32(np.abs(row).max()) if row.size else np.float32(0)
        if peak > 0:
            scales[o] = peak / np.float32(127)
        q[o] = np.clip(np.round(row.astype(np.float64) / np.float64(scales[o])), -127, 127)
    return q.reshape(weight.shape), scales


def float_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and Linear layers that are not MCConv2d (picked by type, not by library code)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear) and not isinstance(module, MCConv2d)
    }


def mcn_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = bare_convert(load_float_model(name, pretrained=False), MCNConfig(planes=4))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MCConv2d):
                module.weight.normal_()
                module.mfilter.uniform_(0.5, 1.5).mul_(math.sqrt(2.0 / module.weight[0].numel()))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.6, 1.4)  # timm zeroes some: keep the net non-trivial
                module.running_var.uniform_(0.6, 1.4)
    return model.eval()


def independent_minimum(model: nn.Module, mode: str) -> int:
    """bits / 8 + float layer weights (4, 2, or 1 byte + a float32 scale per output channel)
    + 4 bytes per other float value + integer bytes, from the state dict."""
    signs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, MCConv2d)}
    weights = {f"{n}.weight" for n in float_layers(model)}
    per_value = {"float32": 4, "float16": 2, "int8": 1}[mode]
    bits = total = 0
    for key, value in model.state_dict().items():
        if key in signs:
            bits += value.numel()
        elif key in weights:
            total += per_value * value.numel() + (4 * value.shape[0] if mode == "int8" else 0)
        else:
            total += value.numel() * value.element_size()
    return math.ceil(bits / 8) + total


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


# --------------------------------------------------------------------------------------------
# the quantizer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 3, 3, 3), (10, 128), (4, 1, 1, 1), (3, 5)])
def test_quantize_matches_naive_reference(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(shape, generator=gen) * torch.rand(shape[0], *[1] * (len(shape) - 1))
    weight[0] = 0.0  # an all-zero channel
    q, scale = quantize_int8(weight)
    ref_q, ref_scale = naive_int8(weight.numpy())
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert np.array_equal(q.numpy(), ref_q)
    assert np.array_equal(scale.numpy(), ref_scale)
    back = dequantize_int8(q, scale).numpy()
    bound = ref_scale.reshape(-1, *[1] * (len(shape) - 1)) / 2
    assert np.all(np.abs(back - weight.numpy()) <= bound * (1 + 1e-6))
    assert np.abs(q.numpy()).max() == 127  # the largest value of a non-zero channel


def test_quantize_along_axis_1_is_the_transposed_reference() -> None:
    weight = torch.randn(6, 9)
    q, scale = quantize_int8(weight, axis=1)
    ref_q, ref_scale = naive_int8(weight.numpy().T)
    assert np.array_equal(q.numpy(), ref_q.T) and np.array_equal(scale.numpy(), ref_scale)


def test_quantize_refuses_non_finite_weights() -> None:
    with pytest.raises(Exception, match="NaN or infinite"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))


# --------------------------------------------------------------------------------------------
# packed file
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> nn.Module:
    return mcn_model("test_resnet")


@pytest.fixture(scope="module")
def small_files(small: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8")
    return {
        mode: export_packed(small, root / f"{mode}.mcn", float_layers=mode)
        for mode in ("float32", "float16", "int8")
    }


def test_packed_int8_round_trip(small: nn.Module, small_files: dict[str, Path]) -> None:
    loaded = load(small_files["int8"])
    assert info_of(loaded).packed_float_layers == "int8"
    meta = header(small_files["int8"])
    assert meta["version"] == "3"  # a version 2 reader would take the int8 values as floats
    assert json.loads(meta["description"])["float_layers"] == "int8"
    layers = float_layers(small)
    assert sorted(layers) == ["conv1.0", "fc"]
    original, got = small.state_dict(), loaded.state_dict()
    for key, value in original.items():
        owner = key.rpartition(".")[0]
        if owner in layers and key.endswith(".weight"):
            assert got[key].dtype == torch.float32
            _, scale = naive_int8(value.numpy())
            bound = torch.from_numpy(scale).reshape(-1, *[1] * (value.dim() - 1)) / 2
            assert torch.all((got[key] - value).abs() <= bound * (1 + 1e-6)), key
            assert not torch.equal(got[key], value), key
        elif isinstance(dict(small.named_modules())[owner], MCConv2d) and key.endswith("weight"):
            assert torch.equal(got[key].sign(), torch.where(value >= 0, 1.0, -1.0)), key
        else:  # biases, BatchNorm, M-Filters: unchanged
            assert torch.equal(got[key], value), key


def test_packed_float16_layers_and_default_unchanged(
    small: nn.Module, small_files: dict[str, Path]
) -> None:
    meta32 = header(small_files["float32"])
    assert meta32["version"] == "2" and "float_layers" not in json.loads(meta32["description"])
    meta16 = header(small_files["float16"])
    assert meta16["version"] == "2"  # float16 entries: version 2 readers read them right
    loaded = load(small_files["float16"])
    assert info_of(loaded).packed_float_layers == "float16"
    fc = small.get_submodule("fc").weight
    assert torch.equal(loaded.get_submodule("fc").weight, fc.half().float())
    assert torch.equal(loaded.get_submodule("bn1").running_var, small.bn1.running_var)
    sizes = {mode: path.stat().st_size for mode, path in small_files.items()}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    for mode, size in sizes.items():
        minimum = independent_minimum(small, mode)
        assert minimum <= size <= minimum * 1.01 + SLACK, mode
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = small(x).numpy()
        for mode, path in small_files.items():
            error = rel_norm(load(path)(x).numpy(), ref)
            assert error <= {"float32": 0.0, "float16": 1e-3, "int8": 0.02}[mode], mode


def test_a_damaged_int8_file_is_refused(small_files: dict[str, Path], tmp_path: Path) -> None:
    raw = bytearray(small_files["int8"].read_bytes())
    raw[-5] ^= 0xFF  # the last blob, in sorted order: the int8 values or their scales
    bad = tmp_path / "bad.mcn"
    bad.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="damaged"):
        load(bad)


def test_resnet18_int8_packed_size(tmp_path: Path) -> None:
    """Issue 16: timm resnet18 K=4 with int8 float layers <= 1.1 MB, >= 42x smaller than its
    float32 weights, close to the theoretical minimum."""
    float_model = load_float_model("resnet18", pretrained=False)
    model = bare_convert(float_model, MCNConfig(planes=4, width="keep"))
    float32_bytes = 4 * sum(
        v.numel() for v in float_model.state_dict().values() if v.is_floating_point()
    )
    size = export_packed(model, tmp_path / "r18.mcn", float_layers="int8").stat().st_size
    minimum = independent_minimum(model, "int8")
    assert size <= MB
    assert float32_bytes / size >= 42
    assert minimum <= size <= minimum * 1.01 + SLACK


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r18() -> nn.Module:
    return mcn_model("resnet18")


@pytest.fixture(scope="module")
def r18_onnx(r18: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8onnx")
    return {
        mode: export_onnx(
            r18, root / f"{mode}.onnx", input_size=64, dynamic_batch=True, float_layers=mode
        ).path
        for mode in ("float32", "float16", "int8")
    }


def test_onnx_int8_matches_float_export(r18: nn.Module, r18_onnx: dict[str, Path]) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref = ort_run(r18_onnx["float32"], x)
    assert rel_norm(ort_run(r18_onnx["int8"], x), ref) <= 0.02
    assert rel_norm(ort_run(r18_onnx["float16"], x), ref) <= 1e-3
    sizes = {mode: path.stat().st_size for mode, path in r18_onnx.items()}
    fc = r18.get_classifier().weight.numel()
    assert sizes["float32"] - sizes["int8"] >= 0.74 * 4 * fc  # 3 of 4 bytes per weight gone
    assert sizes["float32"] - sizes["float16"] >= 0.49 * 4 * fc


def test_onnx_int8_graph(r18: nn.Module, r18_onnx: dict[str, Path]) -> None:
    base = onnx.load(r18_onnx["float32"])
    proto = onnx.load(r18_onnx["int8"])
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {p.key: p.value for p in proto.metadata_props}["mcn_compress.float_layers"] == "int8"
    dequant = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequant) == len(float_layers(r18)) == 2  # stem and classifier only
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    base_inits = {i.name: numpy_helper.to_array(i) for i in base.graph.initializer}
    for node in dequant:
        q, scale, zero = (inits[name] for name in node.input)
        axis = next(a.i for a in node.attribute if a.name == "axis")
        original = base_inits[node.output[0]]  # the float32 export's initializer of that name
        ref_q, ref_scale = naive_int8(np.moveaxis(original, axis, 0))
        assert q.dtype == np.int8 and not zero.any()
        assert np.array_equal(np.moveaxis(q, axis, 0), ref_q)
        assert np.array_equal(scale, ref_scale)
        assert original.shape[axis] == (64 if original.ndim == 4 else 1000)  # output channels
    assert not any(i.dims == [1000, 512] and i.data_type == 1 for i in proto.graph.initializer)
    # the converted layers keep their packed sign bits
    uint8 = sum(i.data_type == onnx.TensorProto.UINT8 for i in proto.graph.initializer)
    assert uint8 == sum(i.data_type == onnx.TensorProto.UINT8 for i in base.graph.initializer)


def test_onnx_folded_leaves_converted_convs_float(small: nn.Module, tmp_path: Path) -> None:
    path = export_onnx(
        small, tmp_path / "f.onnx", weights="folded", input_size=32, float_layers="int8"
    ).path
    proto = onnx.load(path)
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == 2
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = small(torch.from_numpy(x)).numpy()
    assert rel_norm(ort_run(path, x), ref) <= 0.02


def test_onnx_int8_needs_opset_13(small: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="opset 13"):
        export_onnx(small, tmp_path / "x.onnx", opset=12, input_size=32, float_layers="int8")
    with pytest.raises(ConfigError, match="float_layers"):
        export_onnx(small, tmp_path / "x.onnx", input_size=32, float_layers="int4")
    assert not (tmp_path / "x.onnx").exists()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_cli_export_float_layers(small_files: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "m.mcn"
    args = ["export", str(small_files["float32"]), "-o", str(out), "--float-layers", "int8"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["float_layers"] == "int8" and data["bytes"] == out.stat().st_size
    assert data["bytes"] < small_files["float32"].stat().st_size
    onnx_out = tmp_path / "m.onnx"
    res = runner.invoke(
        app,
        [
            "export",
            str(small_files["float32"]),
            "-f",
            "onnx",
            "--float-layers",
            "int8",
            "--opset",
            "12",
            "-o",
            str(onnx_out),
        ],
    )
    assert res.exit_code == 1
    assert "opset 13" in res.output and len(res.output.strip().splitlines()) == 1
    assert not onnx_out.exists()
    bad = tmp_path / "bad.mcn"
    args = ["export", str(small_files["float32"]), "-o", str(bad), "--float-layers", "int4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "int4" in res.output and not bad.exists()
