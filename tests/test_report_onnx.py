"""`report` on ONNX files: size and metadata read from the file, top-1 through onnxruntime on
the same validation images as the PyTorch model (docs/design.md section 6)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from mcn_compress import MCNConfig, convert, export_onnx, load, load_float_model, save
from mcn_compress.cli import app
from mcn_compress.data import build_datasets
from mcn_compress.report_paths import profile_paths
from mcn_compress.training.recipe import DataRecipe

pytest.importorskip("onnxruntime")

DATA = DataRecipe(dataset="synthetic", image_size=28, val_samples=48, batch_size=16, workers=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-report")
    torch.manual_seed(0)
    float_model = load_float_model("mcn_resnet_tiny", pretrained=False, num_classes=4, in_chans=1)
    with torch.no_grad():  # outputs that differ by image, so top-1 is not a constant
        float_model.get_classifier().weight.mul_(10)
    model = convert(float_model.eval(), MCNConfig(planes=4))
    ckpt = save(model, root / "m.pt")
    onnx_path = export_onnx(model, root / "m.onnx", input_size=28, dynamic_batch=True).path
    fixed = export_onnx(model, root / "fixed.onnx", input_size=28, threads=1).path
    foreign = onnx.load(onnx_path)
    del foreign.metadata_props[:]
    onnx.save(foreign, root / "foreign.onnx")
    return {"ckpt": ckpt, "onnx": onnx_path, "fixed": fixed, "foreign": root / "foreign.onnx"}


def naive_top1(path: Path) -> float:
    """Top-1 of the checkpoint on the validation split, one image at a time."""
    model = load(path).eval()
    _, val = build_datasets(DATA, model, seed=0)
    hits = 0
    with torch.no_grad():
        for index in range(len(val)):  # type: ignore[arg-type]
            image, label = val[index]
            hits += int(model(image[None]).argmax(1).item() == label)
    return 100.0 * hits / len(val)  # type: ignore[arg-type]


def test_onnx_rows_match_the_checkpoint_on_the_same_images(files: dict[str, Path]) -> None:
    rows = profile_paths([files["ckpt"], files["onnx"], files["fixed"]], data=DATA)
    float_row, ckpt_row, onnx_row, fixed_row = rows
    assert float_row.kind == "float" and ckpt_row.kind == "mcn"
    expected = naive_top1(files["ckpt"])
    assert 0 < expected < 100  # the reference can tell a wrong model from a right one
    for row in (ckpt_row, onnx_row, fixed_row):
        assert row.top1 == pytest.approx(expected) and row.eval_samples == 48
    assert onnx_row.kind == "onnx" and onnx_row.file_bytes == files["onnx"].stat().st_size
    assert onnx_row.architecture == "mcn_resnet_tiny" and onnx_row.planes == 4
    assert onnx_row.float32_bytes == float_row.float32_bytes
    assert onnx_row.ratio == pytest.approx(float_row.float32_bytes / onnx_row.file_bytes)
    assert onnx_row.onnx is not None and onnx_row.onnx["activations"] == "float32"
    assert fixed_row.onnx is not None and fixed_row.onnx["threads"] == "1"
    assert fixed_row.onnx["input_shape"] == [1, 1, 28, 28]  # batch 1: run image by image


def test_foreign_onnx_is_sized_without_a_float_row(files: dict[str, Path]) -> None:
    rows = profile_paths([files["foreign"]])
    assert [r.kind for r in rows] == ["onnx"]
    assert rows[0].architecture == "(ONNX graph)" and rows[0].ratio is None
    assert rows[0].min_bytes is None and rows[0].within_bound is None


def test_cli_report_json_and_bad_onnx(files: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(files["onnx"]), "--json"])
    assert result.exit_code == 0, result.output
    models = json.loads(result.stdout)["models"]
    assert models[-1]["onnx"]["bytes"] == files["onnx"].stat().st_size
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx at all")
    result = CliRunner().invoke(app, ["report", str(bad)])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "ONNX" in result.stderr
