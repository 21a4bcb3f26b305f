"""Tests of `mcn_compress.report` (profiles) and `mcn-compress report` (rendering).

Expected numbers are counted here from the float model and the raw checkpoint (DESIGN.md
section 2: a converted conv keeps ``out/K * in * kh * kw`` signs and ``K * kh * kw`` M values),
and file sizes are read from files the test writes itself.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from mcn_compress.checkpoint import save
from mcn_compress.cli import app
from mcn_compress.config import MCNConfig
from mcn_compress.convert import convert
from mcn_compress.errors import CheckpointError
from mcn_compress.export import export_packed
from mcn_compress.models import load_float_model
from mcn_compress.report import ModelProfile, profile_paths

K = 4
SLACK = 16 * 1024
NAME = "test_resnet"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A float model with its weights in a local file, its checkpoint and packed file."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("report")
    float_model = load_float_model(NAME, pretrained=False)
    weights = root / "float.safetensors"
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(weights))
    float_model = load_float_model(NAME, weights=weights).eval()
    model = convert(float_model, MCNConfig(planes=K))
    ckpt = save(model, root / "model.pt")
    packed = export_packed(model, root / "model.mcn")
    return {"float": float_model, "ckpt": ckpt, "packed": packed, "root": root}


def expected_counts(float_model: nn.Module, layers: list[str]) -> dict[str, int]:
    """Counts of the MCN model derived from the float model and the converted layer names."""
    modules = dict(float_model.named_modules())
    convs = [modules[name] for name in layers]
    params = sum(p.numel() for p in float_model.parameters())
    buffers = sum(b.numel() for b in float_model.buffers() if b.is_floating_point())
    weights = sum(c.weight.numel() for c in convs)
    mfilters = sum(K * c.kernel_size[0] * c.kernel_size[1] for c in convs)
    weight_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in float_model.modules())
    int_bytes = sum(
        b.numel() * b.element_size() for b in float_model.buffers() if not b.is_floating_point()
    )
    float_params = params - weights + mfilters
    return {
        "binary_params": weights // K,
        "float_params": float_params,
        "float_buffers": buffers,
        "converted_layers": len(convs),
        "float_layers": weight_layers - len(convs),
        "min_bytes": math.ceil(weights // K / 8) + 4 * (float_params + buffers) + int_bytes,
        "float32_min": 4 * (params + buffers) + int_bytes,
    }


def layers_of(ckpt: Path) -> list[str]:
    return list(torch.load(ckpt, weights_only=True)["layers"])


# --------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------
def test_profiles_match_independent_counts_and_real_files(files: dict[str, Any]) -> None:
    profiles = profile_paths([files["ckpt"], files["packed"]])
    assert [p.kind for p in profiles] == ["float", "mcn", "mcn"]  # float original first, once
    expected = expected_counts(files["float"], layers_of(files["ckpt"]))
    float_row, ckpt_row, packed_row = profiles

    assert float_row.architecture == NAME and float_row.binary_params == 0
    assert float_row.converted_layers == 0
    assert float_row.float_layers == expected["float_layers"] + expected["converted_layers"]
    assert float_row.min_bytes == expected["float32_min"]
    assert float_row.packed_bytes is None and float_row.ratio == 1.0

    packed_size = files["packed"].stat().st_size
    for row in (ckpt_row, packed_row):
        assert row.architecture == NAME and row.planes == K and row.width == "keep"
        for key in ("binary_params", "float_params", "float_buffers", "converted_layers"):
            assert getattr(row, key) == expected[key], key
        assert row.float_layers == expected["float_layers"]
        assert row.min_bytes == expected["min_bytes"]
        assert row.packed_bytes == packed_size
        assert row.float32_bytes == float_row.float32_bytes
        assert row.ratio == pytest.approx(float_row.float32_bytes / packed_size)
        assert row.within_bound and row.min_bytes <= packed_size
    assert ckpt_row.input_bytes == files["ckpt"].stat().st_size
    assert packed_row.input_bytes == packed_size
    f32 = expected["float32_min"]
    assert f32 <= float_row.float32_bytes <= f32 * 1.01 + SLACK


def test_float16_measures_half_floats(files: dict[str, Any]) -> None:
    row = profile_paths([files["ckpt"]], float16=True)[1]
    expected = expected_counts(files["float"], layers_of(files["ckpt"]))
    floats = expected["float_params"] + expected["float_buffers"]
    assert row.float16
    assert row.min_bytes == expected["min_bytes"] - 2 * floats
    out = export_packed(row_model(files["ckpt"]), files["root"] / "fp16.mcn", float16=True)
    assert row.packed_bytes == out.stat().st_size


def row_model(path: Path) -> nn.Module:
    from mcn_compress.checkpoint import load

    return load(path)


def naive_q(conv_weight: torch.Tensor, mfilter: torch.Tensor) -> torch.Tensor:
    """``Q[h*K + j, c] = sign(C[h, c]) * M[j]`` with a loop over planes j (sign(0) = +1)."""
    signs = torch.where(conv_weight >= 0, 1.0, -1.0)
    planes = [signs * mfilter[j] for j in range(mfilter.shape[0])]
    return torch.stack(planes, dim=1).reshape(-1, *conv_weight.shape[1:])


def test_per_layer_rows_sum_to_totals_and_errors_use_float_weights(
    files: dict[str, Any],
) -> None:
    profiles = profile_paths([files["packed"]], per_layer=True)
    row = profiles[1]
    assert row.layers is not None
    assert sum(r.bits for r in row.layers) == row.binary_params
    assert sum(r.float_params for r in row.layers) == row.float_params
    state = torch.load(files["ckpt"], weights_only=True)["state_dict"]
    float_state = files["float"].state_dict()
    layers = set(layers_of(files["ckpt"]))
    by_name = {r.name: r for r in row.layers}
    for name in layers:
        w0 = float_state[f"{name}.weight"]
        q = naive_q(state[f"{name}.weight"], state[f"{name}.mfilter"])
        expected = float(torch.linalg.vector_norm(w0 - q) / torch.linalg.vector_norm(w0))
        assert by_name[name].kind == "mcn"
        assert by_name[name].shape == tuple(w0.shape)
        assert by_name[name].bits == w0.numel() // K
        assert by_name[name].rel_error == pytest.approx(expected, rel=1e-5)
    assert all(r.rel_error is None for r in row.layers if r.name not in layers)
    assert profiles[0].layers is not None
    assert all(r.bits == 0 and r.rel_error is None for r in profiles[0].layers)


def test_per_layer_error_unavailable_without_float_weights(tmp_path: Path) -> None:
    model = convert(load_float_model(NAME, pretrained=False), MCNConfig(planes=K))
    ckpt = save(model, tmp_path / "random.pt")
    row = profile_paths([ckpt], per_layer=True)[1]
    assert row.layers and all(r.rel_error is None for r in row.layers)


def test_latency_is_measured(files: dict[str, Any]) -> None:
    profiles = profile_paths([files["packed"]], latency=True, input_size=32)
    assert all(p.latency_ms is not None and p.latency_ms > 0 for p in profiles)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="directory"):
        profile_paths([tmp_path])


# --------------------------------------------------------------------------------------------
# CLI: formats carry the same numbers
# --------------------------------------------------------------------------------------------
def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["report", *args], env={"COLUMNS": "250"})


def parse_int(cell: str) -> int | None:
    token = cell.split()[0] if cell.split() else "-"
    return None if token == "-" else int(token.replace(",", ""))


def table_rows(text: str) -> dict[str, list[str]]:
    """First Rich table of ``text``: row title -> cells (one per model)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("└"):
            break
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


NUMERIC = {
    "binary params": "binary_params",
    "float params": "float_params",
    "float buffers": "float_buffers",
    "MCN layers": "converted_layers",
    "float layers": "float_layers",
    "input file bytes": "input_bytes",
    "float32 original bytes": "float32_bytes",
    "packed bytes": "packed_bytes",
    "theoretical min bytes": "min_bytes",
}


def test_cli_json_csv_table_markdown_agree(files: dict[str, Any]) -> None:
    paths = [str(files["ckpt"]), str(files["packed"])]
    res_json = run(*paths, "--format", "json", "--per-layer")
    assert res_json.exit_code == 0, res_json.output
    models = json.loads(res_json.stdout)["models"]
    assert [m["kind"] for m in models] == ["float", "mcn", "mcn"]
    expected = expected_counts(files["float"], layers_of(files["ckpt"]))
    assert models[1]["binary_params"] == expected["binary_params"]
    assert models[2]["packed_bytes"] == files["packed"].stat().st_size

    res_csv = run(*paths, "--format", "csv", "--per-layer")
    assert res_csv.exit_code == 0, res_csv.output
    summary_part, layer_part = res_csv.stdout.split("\n\n")
    rows = list(csv.DictReader(io.StringIO(summary_part)))
    assert len(rows) == 3
    for row, model in zip(rows, models, strict=True):
        for key in NUMERIC.values():
            assert row[key] == ("" if model[key] is None else str(model[key])), key
        assert float(row["ratio"]) == pytest.approx(model["ratio"])
    layer_rows = list(csv.DictReader(io.StringIO(layer_part)))
    assert len(layer_rows) == sum(len(m["layers"]) for m in models)
    bits = sum(int(r["bits"]) for r in layer_rows if r["model"] == str(files["packed"]))
    assert bits == models[2]["binary_params"]

    res_table = run(*paths)
    assert res_table.exit_code == 0, res_table.output
    table = table_rows(res_table.stdout)
    for title, key in NUMERIC.items():
        assert [parse_int(c) for c in table[title]] == [m[key] for m in models], title
    assert table["compression vs float32"] == [f"{m['ratio']:.2f}x" for m in models]

    res_md = run(*paths, "--format", "markdown")
    assert res_md.exit_code == 0, res_md.output
    lines = [ln for ln in res_md.stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    md_rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert len(md_rows) == 3
    for cells, model in zip(md_rows, models, strict=True):
        for title, key in NUMERIC.items():
            assert parse_int(cells[header.index(title)]) == model[key], title


def test_cli_table_per_layer_and_latency(files: dict[str, Any]) -> None:
    result = run(str(files["packed"]), "--per-layer", "--latency", "--input-size", "32")
    assert result.exit_code == 0, result.output
    assert "Layers of" in result.stdout and "latency ms/image" in result.stdout
    rows = table_rows(result.stdout)
    assert all(float(c) > 0 for c in rows["latency ms/image"])


# --------------------------------------------------------------------------------------------
# CLI: bad input
# --------------------------------------------------------------------------------------------
def bad_input(kind: str, files: dict[str, Any], root: Path) -> Path:
    packed = files["packed"].read_bytes()
    path = root / f"{kind}.mcn"
    if kind == "missing":
        return root / "absent.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("not a model")
    elif kind == "foreign_safetensors":
        save_file({"w": torch.ones(2)}, str(path))
    elif kind == "foreign_torch":
        torch.save([1, 2, 3], path)
    elif kind == "truncated_packed":
        path.write_bytes(packed[: len(packed) - 100])
    elif kind == "truncated_checkpoint":
        path.write_bytes(files["ckpt"].read_bytes()[:1000])
    elif kind == "corrupt_packed":
        data = bytearray(packed)
        data[-50] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "directory",
        "text",
        "foreign_safetensors",
        "foreign_torch",
        "truncated_packed",
        "truncated_checkpoint",
        "corrupt_packed",
    ],
)
@pytest.mark.parametrize("fmt", ["table", "json"])
def test_cli_bad_input_one_line_no_output(
    kind: str, fmt: str, files: dict[str, Any], tmp_path: Path
) -> None:
    bad = bad_input(kind, files, tmp_path)
    result = run(str(files["packed"]), str(bad), "--format", fmt)  # good file first
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and bad.name in lines[0], lines
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ([bad.name] if bad.exists() else [])


def test_cli_unknown_format_option_is_refused(files: dict[str, Any]) -> None:
    result = run(str(files["packed"]), "--format", "xml")
    assert result.exit_code != 0
    assert result.stdout == ""


def test_profile_to_dict_round_trips_json(files: dict[str, Any]) -> None:
    profiles = profile_paths([files["packed"]])
    data = json.loads(json.dumps([p.to_dict() for p in profiles]))
    assert data[1]["packed_bytes"] == files["packed"].stat().st_size
    assert isinstance(profiles[1], ModelProfile)
