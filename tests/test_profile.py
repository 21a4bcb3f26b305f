"""Tests of `mcn_compress.profile` (profiles, accuracy, run directories, training curves) and
`mcn-compress report` (rendering).

Expected numbers are counted here from the float model and the raw checkpoint (docs/design.md
section 2: a converted conv keeps ``out/K * in * kh * kw`` signs and ``K * kh * kw`` M values),
file sizes are read from files the test writes itself, accuracies are recounted with a naive
loop over single samples, and run numbers are read from the run's own ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from report_helpers import (
    NAME,
    SLACK,
    K,
    expected_counts,
    layers_of,
)
from torch import nn
from typer.testing import CliRunner

from mcn_compress import (
    MCNConfig,
    convert,
    export_packed,
    load_float_model,
    save,
)
from mcn_compress.cli import app
from mcn_compress.profile import ModelProfile
from mcn_compress.report_paths import profile_paths


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
    from mcn_compress import load

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


def test_profile_to_dict_round_trips_json(files: dict[str, Any]) -> None:
    profiles = profile_paths([files["packed"]])
    data = json.loads(json.dumps([p.to_dict() for p in profiles]))
    assert data[1]["packed_bytes"] == files["packed"].stat().st_size
    assert isinstance(profiles[1], ModelProfile)


def test_expand_report_counts_float_original_and_k_squared_macs(tmp_path: Path) -> None:
    """width expand: the float original's size is the unwidened model's; conv MACs grow ~K^2."""
    from mcn_compress import MCNConfig, convert, load_float_model, save

    float_model = load_float_model("mcn_resnet_small", pretrained=False).eval()
    expected_float_bytes = 4 * sum(
        v.numel() for v in float_model.state_dict().values() if v.is_floating_point()
    )

    def naive_macs(model: torch.nn.Module) -> int:
        total = 0

        def hook(mod: torch.nn.Module, _: object, out: torch.Tensor) -> None:
            nonlocal total
            total += out[0].numel() * mod.weight[0].numel()

        handles = [
            m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
        ]
        with torch.no_grad():
            model(torch.zeros(1, 1, 28, 28))
        for h in handles:
            h.remove()
        return total

    keep_macs = naive_macs(float_model)
    profiles = {}
    for width in ("keep", "expand"):
        path = save(
            convert(float_model, MCNConfig(planes=2, width=width)), tmp_path / f"{width}.pt"
        )
        result = CliRunner().invoke(app, ["report", str(path), "--format", "json"])
        assert result.exit_code == 0, result.stderr
        rows = json.loads(result.stdout)["models"]
        profiles[width] = next(r for r in rows if r["kind"] == "mcn")
    for width in ("keep", "expand"):
        got = profiles[width]["float32_bytes"]
        assert expected_float_bytes <= got <= expected_float_bytes + 16 * 1024, width
    assert profiles["keep"]["conv_macs"] == keep_macs
    ratio = profiles["expand"]["conv_macs"] / keep_macs
    assert 3.5 < ratio <= 4.0  # K^2 = 4 on the converted convs; the float stem is not widened
