"""Tests of the packed 1-bit file (`mcn_compress.formats.packed`) and `mcn-compress export`.

References are written here: sign bits via numpy's ``packbits`` (little bit order), the
theoretical minimum counted from the checkpoint's own state dict, outputs compared with the
checkpoint model's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import bare_convert
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import mcn_compress
from mcn_compress import (
    CheckpointError,
    MCNConfig,
    export_packed,
    info_of,
    load_float_model,
    save,
)
from mcn_compress.cli import app
from mcn_compress.formats.load import load
from mcn_compress.formats.packed import load_packed, pack_signs, unpack_signs
from mcn_compress.nn.mcconv import MCConv2d

SLACK = 16 * 1024


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and buffer a distinctive value, so that a load that forgets any
    entry (BN statistics, biases, M-Filters, counters) changes the outputs or the state dict.
    Latent C gets exact +0.0 and -0.0 entries (sign(0) = +1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, MCConv2d):
                module.weight.normal_(generator=gen)
                flat = module.weight.view(-1)
                flat[0], flat[1] = 0.0, -0.0
                module.mfilter.uniform_(0.5, 1.5, generator=gen)
                module.mfilter.mul_(math.sqrt(2.0 / module.weight[0].numel()))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.8, 1.2, generator=gen)
                module.bias.normal_(0, 0.1, generator=gen)
                module.running_mean.normal_(0, 0.1, generator=gen)
                module.running_var.uniform_(0.8, 1.2, generator=gen)
                module.num_batches_tracked.fill_(int(torch.randint(1, 999, (), generator=gen)))
            elif name and isinstance(module, nn.Linear | nn.Conv2d) and module.bias is not None:
                module.bias.normal_(0, 0.05, generator=gen)
    return model


def mcn_model(name: str, **kwargs: object) -> nn.Module:
    float_model = load_float_model(name, pretrained=False, **kwargs)  # type: ignore[arg-type]
    return scramble(bare_convert(float_model, MCNConfig(planes=4))).eval()


def independent_minimum(checkpoint: Path, bytes_per_float: int) -> int:
    """Theoretical minimum bytes (bits / 8 + bytes per float + integer bytes), counted from the
    raw checkpoint dict (no library code)."""
    data = torch.load(checkpoint, weights_only=True)
    latent = {f"{name}.weight" for name in data["layers"]}
    bits = floats = ints = 0
    for key, value in data["state_dict"].items():
        if key in latent:
            bits += value.numel()
        elif value.is_floating_point():
            floats += value.numel()
        else:
            ints += value.numel() * value.element_size()
    return math.ceil(bits / 8) + bytes_per_float * floats + ints


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --------------------------------------------------------------------------------------------
# sign packing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (5, 3, 3, 3), (16, 64, 1, 1)])
def test_pack_signs_matches_numpy_little_bit_order(shape: tuple[int, ...]) -> None:
    latent = torch.randn(shape)
    latent.view(-1)[0] = 0.0
    if latent.numel() > 1:
        latent.view(-1)[1] = -0.0
    packed = pack_signs(latent)
    expected = np.packbits((latent.reshape(-1) >= 0).numpy(), bitorder="little")
    assert packed.dtype == torch.uint8
    assert packed.numpy().tolist() == expected.tolist()
    signs = unpack_signs(packed, shape)
    assert torch.equal(signs, torch.where(latent >= 0, 1.0, -1.0))


def test_pack_signs_first_element_is_lowest_bit() -> None:
    latent = -torch.ones(10)
    latent[0] = 1.0
    latent[9] = 0.0  # sign(0) = +1
    assert pack_signs(latent).tolist() == [0b00000001, 0b00000010]


def test_unpack_rejects_wrong_byte_count() -> None:
    with pytest.raises(ValueError, match="sign bits"):
        unpack_signs(torch.zeros(3, dtype=torch.uint8), (5, 5))


# --------------------------------------------------------------------------------------------
# round trip on zoo models
# --------------------------------------------------------------------------------------------
ZOO = ["resnet18", "efficientnet_b0", "regnety_002", "tv:mobilenet_v2"]


@pytest.mark.parametrize("name", ZOO)
def test_round_trip_is_exact_and_within_bound(name: str, tmp_path: Path) -> None:
    model = mcn_model(name)
    ckpt = save(model, tmp_path / "model.pt")
    packed = export_packed(model, tmp_path / "model.mcn")
    packed16 = export_packed(model, tmp_path / "model16.mcn", float16=True)

    reference = mcn_compress.load(ckpt)
    loaded = mcn_compress.load(packed)
    x = torch.randn(2, 3, 64, 64)
    expected = outputs(reference, x)
    assert torch.isfinite(expected).all()
    assert torch.equal(outputs(loaded, x), expected)
    assert torch.equal(outputs(model, x), expected)

    # every stored entry comes back: exact values, dtypes kept; latent C only as its signs
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    latent = {f"{n}.weight" for n, m in reference.named_modules() if isinstance(m, MCConv2d)}
    assert ref_state.keys() == got_state.keys()
    for key, value in ref_state.items():
        assert got_state[key].dtype == value.dtype, key
        if key in latent:
            assert torch.equal(got_state[key], torch.where(value >= 0, 1.0, -1.0)), key
        else:
            assert torch.equal(got_state[key], value), key

    minimum = independent_minimum(ckpt, bytes_per_float=4)
    size = packed.stat().st_size
    assert minimum <= size <= minimum * 1.01 + SLACK
    minimum16 = independent_minimum(ckpt, bytes_per_float=2)
    size16 = packed16.stat().st_size
    assert minimum16 <= size16 <= minimum16 * 1.01 + SLACK

    # float16: close, not identical
    loaded16 = mcn_compress.load(packed16)
    got16 = outputs(loaded16, x)
    scale = expected.abs().max()
    assert (got16 - expected).abs().max() <= 0.05 * scale
    assert info_of(loaded16).packed_float16 is True


@pytest.mark.parametrize("config", [MCNConfig(planes=2, mcn1=True), MCNConfig(planes=1)])
def test_round_trip_other_configs(config: MCNConfig, tmp_path: Path) -> None:
    float_model = load_float_model("test_resnet", pretrained=False)
    model = scramble(bare_convert(float_model, config)).eval()
    loaded = load_packed(export_packed(model, tmp_path / "m.mcn"))
    assert info_of(loaded).config == config
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_resnet18_goal_15x_smaller_than_float32(tmp_path: Path) -> None:
    """Goal of the issue: timm resnet18, K=4, width keep: >= 15x below float32, within bound."""
    float_model = load_float_model("resnet18", pretrained=False)
    model = bare_convert(float_model, MCNConfig(planes=4, width="keep"))
    ckpt = save(model, tmp_path / "r18.pt")
    packed = export_packed(model, tmp_path / "r18.mcn")
    float32_bytes = 4 * sum(
        v.numel() for v in float_model.state_dict().values() if v.is_floating_point()
    )
    size = packed.stat().st_size
    assert float32_bytes / size >= 15
    minimum = independent_minimum(ckpt, bytes_per_float=4)
    assert size <= minimum * 1.01 + SLACK


def test_small_head_stays_within_bound(tmp_path: Path) -> None:
    """Per-entry overhead must not dominate when the float part is small (10 classes)."""
    model = mcn_model("regnety_002", num_classes=10)
    ckpt = save(model, tmp_path / "m.pt")
    size = export_packed(model, tmp_path / "m.mcn").stat().st_size
    minimum = independent_minimum(ckpt, bytes_per_float=4)
    assert minimum <= size <= minimum * 1.01 + SLACK


def test_latent_filters_not_stored(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = mcn_model("test_resnet")
    path = export_packed(model, tmp_path / "m.mcn")
    bits = sum(m.weight.numel() for m in model.modules() if isinstance(m, MCConv2d))
    layers = sum(isinstance(m, MCConv2d) for m in model.modules())
    with safe_open(str(path), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert stored["signs"].dtype == torch.uint8
    assert bits / 8 <= stored["signs"].numel() <= bits / 8 + layers  # <= 1 pad byte per layer
    other = sum(v.numel() for v in model.state_dict().values()) - bits
    assert sum(t.numel() for k, t in stored.items() if k != "signs") == other
    description = json.loads(meta["description"])
    assert description["model"]["name"] == "test_resnet"
    assert "state_dict" not in description
    loaded = load_packed(path)
    for module in loaded.modules():
        if isinstance(module, MCConv2d):
            assert set(module.weight.unique().tolist()) <= {-1.0, 1.0}


def test_load_dispatches_by_content_not_suffix(tmp_path: Path) -> None:
    model = mcn_model("test_resnet")
    x = torch.randn(1, 3, 32, 32)
    packed_as_pt = export_packed(model, tmp_path / "packed.pt")
    ckpt_as_mcn = save(model, tmp_path / "checkpoint.mcn")
    assert torch.equal(outputs(mcn_compress.load(packed_as_pt), x), outputs(model, x))
    assert torch.equal(outputs(mcn_compress.load(ckpt_as_mcn), x), outputs(model, x))


def test_export_of_loaded_packed_file_is_stable(tmp_path: Path) -> None:
    model = mcn_model("test_resnet")
    first = export_packed(model, tmp_path / "a.mcn")
    second = export_packed(load_packed(first), tmp_path / "b.mcn")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(outputs(load_packed(second), x), outputs(model, x))
    assert first.stat().st_size == pytest.approx(second.stat().st_size, abs=64)


def test_export_refuses_unconverted_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        export_packed(nn.Conv2d(4, 4, 3), tmp_path / "x.mcn")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("good")
    model = mcn_model("test_resnet")
    return {
        "ckpt": save(model, root / "model.pt"),
        "packed": export_packed(model, root / "model.mcn"),
    }


def make_bad(kind: str, good: dict[str, Path], root: Path) -> Path:
    """A bad input file of the given kind, built from the good files."""
    packed = good["packed"].read_bytes()
    ckpt = good["ckpt"].read_bytes()
    header_end = 8 + int.from_bytes(packed[:8], "little")
    path = root / f"{kind}.mcn"
    if kind == "missing":
        return root / "does-not-exist.mcn"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, this is not a model\n")
    elif kind == "foreign_safetensors":
        save_file({"weight": torch.zeros(3)}, str(path))
    elif kind == "foreign_torch":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "truncated_5":
        path.write_bytes(packed[:5])
    elif kind == "truncated_header":
        path.write_bytes(packed[: header_end // 2])
    elif kind == "truncated_data":
        path.write_bytes(packed[: (header_end + len(packed)) // 2])
    elif kind == "truncated_last_byte":
        path.write_bytes(packed[:-1])
    elif kind == "trailing_bytes":
        path.write_bytes(packed + b"\0" * 8)
    elif kind == "flipped_data":
        data = bytearray(packed)
        data[header_end + (len(packed) - header_end) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "corrupt_header_json":
        data = bytearray(packed)
        data[9:13] = b"@@@@"
        path.write_bytes(bytes(data))
    elif kind == "truncated_checkpoint":
        path = root / "truncated.pt"
        path.write_bytes(ckpt[: len(ckpt) // 2])
    else:
        raise AssertionError(kind)
    return path


BAD_KINDS = [
    "missing",
    "directory",
    "empty",
    "text",
    "foreign_safetensors",
    "foreign_torch",
    "truncated_5",
    "truncated_header",
    "truncated_data",
    "truncated_last_byte",
    "trailing_bytes",
    "flipped_data",
    "corrupt_header_json",
    "truncated_checkpoint",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_cli_export_bad_input_one_line_no_output(
    kind: str, good_files: dict[str, Path], tmp_path: Path
) -> None:
    bad = make_bad(kind, good_files, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = CliRunner().invoke(app, ["export", str(bad), "--out", str(out_dir / "m.mcn")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert result.stdout == ""
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "kind", [k for k in BAD_KINDS if k not in ("missing", "directory", "foreign_torch")]
)
def test_load_bad_packed_file_raises_checkpoint_error(
    kind: str, good_files: dict[str, Path], tmp_path: Path
) -> None:
    bad = make_bad(kind, good_files, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load(bad)
    assert "\n" not in str(info.value)
    assert str(bad) in str(info.value)


def test_cli_export_writes_packed_file(good_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model.mcn"
    result = CliRunner().invoke(
        app, ["export", str(good_files["ckpt"]), "--format", "packed", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["bytes"] == out.stat().st_size
    minimum = independent_minimum(good_files["ckpt"], bytes_per_float=4)
    assert info["min_bytes"] == minimum
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(
        outputs(mcn_compress.load(out), x), outputs(mcn_compress.load(good_files["ckpt"]), x)
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model.mcn"]


def test_cli_export_float16_is_smaller(good_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model16.mcn"
    result = CliRunner().invoke(
        app, ["export", str(good_files["ckpt"]), "--float16", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    minimum16 = independent_minimum(good_files["ckpt"], bytes_per_float=2)
    assert minimum16 <= out.stat().st_size <= minimum16 * 1.01 + SLACK


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx", "--float16"], "--float16"),  # float16 is a packed-only option
        (["--format", "tflite"], None),  # rejected by the option's choices
    ],
)
def test_cli_export_format_option(
    args: list[str], message: str | None, good_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(good_files["ckpt"]), *args, "-o", str(out)])
    assert result.exit_code != 0
    if message:
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_export_to_missing_directory(good_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "nowhere" / "m.mcn"
    result = CliRunner().invoke(app, ["export", str(good_files["ckpt"]), "-o", str(out)])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert not out.parent.exists()
