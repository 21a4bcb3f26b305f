"""Tests of `mcn-compress report`: JSON, CSV, table and markdown agree with independent
counts; progress, plots and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from report_helpers import (
    expected_counts,
    layers_of,
    metrics_rows,
    needs_fashion,
    run,
)
from safetensors.torch import save_file

from mcn_compress.cli.report import DataChoice
from mcn_compress.training.recipe import DatasetName


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
    "run epochs": "run_epochs",
    "eval images": "eval_samples",
}


PERCENT = {
    "run final val top-1 %": "run_final_top1",
    "run best val top-1 %": "run_best_top1",
    "top-1 %": "top1",
    "top-5 %": "top5",
}


EVAL = ["--data", "synthetic", "--image-size", "32", "--val-samples", "16", "--workers", "0"]


def percent_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def test_cli_json_csv_table_markdown_agree(files: dict[str, Any], run_dir: Path) -> None:
    """Checkpoint, packed file and run directory, evaluated on synthetic data: every format
    carries the same sizes, run metrics and accuracies."""
    paths = [str(files["ckpt"]), str(files["packed"]), str(run_dir), *EVAL]
    res_json = run(*paths, "--format", "json", "--per-layer")
    assert res_json.exit_code == 0, res_json.output
    assert res_json.stderr == ""
    models = json.loads(res_json.stdout)["models"]
    assert [m["kind"] for m in models] == ["float", "mcn", "mcn", "float", "mcn"]
    expected = expected_counts(files["float"], layers_of(files["ckpt"]))
    assert models[1]["binary_params"] == expected["binary_params"]
    assert models[2]["packed_bytes"] == files["packed"].stat().st_size
    # the test_resnet original has its weights file: evaluated; the run's original has none
    assert [m["top1"] is None for m in models] == [False, False, False, True, False]
    assert models[4]["run_best_top1"] == max(r["val_top1"] for r in metrics_rows(run_dir))
    assert models[4]["eval_dataset"] == "synthetic" and models[4]["eval_samples"] == 16

    res_csv = run(*paths, "--format", "csv", "--per-layer")
    assert res_csv.exit_code == 0, res_csv.output
    summary_part, layer_part = res_csv.stdout.split("\n\n")
    rows = list(csv.DictReader(io.StringIO(summary_part)))
    assert len(rows) == 5
    for row, model in zip(rows, models, strict=True):
        for key in (*NUMERIC.values(), "eval_dataset"):
            assert row[key] == ("" if model[key] is None else str(model[key])), key
        for key in ("ratio", *PERCENT.values()):
            assert (None if row[key] == "" else float(row[key])) == model[key], key
    layer_rows = list(csv.DictReader(io.StringIO(layer_part)))
    assert len(layer_rows) == sum(len(m["layers"]) for m in models)
    bits = sum(int(r["bits"]) for r in layer_rows if r["model"] == str(files["packed"]))
    assert bits == models[2]["binary_params"]

    res_table = run(*paths)
    assert res_table.exit_code == 0, res_table.output
    table = table_rows(res_table.stdout)
    for title, key in NUMERIC.items():
        assert [parse_int(c) for c in table[title]] == [m[key] for m in models], title
    for title, key in PERCENT.items():
        assert table[title] == [percent_cell(m[key]) for m in models], title
    assert table["eval data"] == [m["eval_dataset"] or "-" for m in models]
    assert table["compression vs float32"] == [f"{m['ratio']:.2f}x" for m in models]

    res_md = run(*paths, "--format", "markdown")
    assert res_md.exit_code == 0, res_md.output
    lines = [ln for ln in res_md.stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    md_rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert len(md_rows) == 5
    for cells, model in zip(md_rows, models, strict=True):
        for title, key in NUMERIC.items():
            assert parse_int(cells[header.index(title)]) == model[key], title
        for title, key in PERCENT.items():
            assert cells[header.index(title)] == percent_cell(model[key]), title


def test_cli_without_runs_or_data_has_no_such_rows(files: dict[str, Any]) -> None:
    result = run(str(files["packed"]))
    assert result.exit_code == 0, result.output
    assert not set(table_rows(result.stdout)) & {*PERCENT, "run epochs", "eval images"}


def test_cli_progress_bar_on_a_terminal(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an interactive stderr the evaluation draws a bar per model (off in tests otherwise)."""
    from rich.console import Console

    import mcn_compress.cli.report as cli_report

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, force_interactive=True, width=150)
    monkeypatch.setattr(cli_report, "err", terminal)
    result = run(str(run_dir), *EVAL, "--batch-size", "4", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert f"top-1/top-5 {run_dir}" in screen.getvalue()
    assert "16/16" in screen.getvalue()


def test_cli_dataset_choices_are_the_recipes() -> None:
    assert [c.value for c in DataChoice] == list(get_args(DatasetName))


def test_cli_plot_writes_the_image(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    out = tmp_path / "curves.png"
    result = run(str(run_dir), "--plot", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(result.stdout)["models"][1]["run_epochs"] == 2


def test_cli_table_per_layer_and_latency(files: dict[str, Any]) -> None:
    result = run(str(files["packed"]), "--per-layer", "--latency", "--input-size", "32")
    assert result.exit_code == 0, result.output
    assert "Layers of" in result.stdout and "latency ms/image" in result.stdout
    rows = table_rows(result.stdout)
    assert all(float(c) > 0 for c in rows["latency ms/image"])


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


def cli_error(result: Any) -> str:
    """The single error line of a failed run (asserting there is exactly one, no stdout)."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--val-samples", "10"], "--val-samples only apply with --data DATASET"),
        (["--data", "synthetic", "--val-samples", "0"], "--val-samples: expected a positive"),
        (["--data", "synthetic", "--image-size", "4"], "--image-size: expected an integer >= 8"),
        (["--data", "imagefolder"], "--data-root: required for dataset imagefolder"),
        (["--data", "fashion_mnist", "--data-root", "/nonexistent"], "Fashion-MNIST not found"),
        (["--data", "cifar10", "--data-root", "/nonexistent"], "CIFAR-10 not found"),
    ],
)
def test_cli_bad_data_options(files: dict[str, Any], options: list[str], message: str) -> None:
    assert message in cli_error(run(str(files["packed"]), *options))


@needs_fashion
def test_cli_dataset_with_more_classes_than_the_model(run_dir: Path) -> None:
    line = cli_error(run(str(run_dir), "--data", "fashion_mnist", "--val-samples", "10"))
    assert f"fashion_mnist has 10 classes but {run_dir} predicts 4" in line


@pytest.mark.parametrize("case", ["model_file", "no_metrics", "bad_suffix"])
def test_cli_bad_plot_leaves_no_file(
    case: str, files: dict[str, Any], run_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    out = tmp_path / ("curves.xyz" if case == "bad_suffix" else "curves.png")
    if case == "model_file":
        target, message = files["ckpt"], "--plot draws training curves of run directories"
    elif case == "no_metrics":
        target, message = tmp_path / "run", "metrics.jsonl is missing or empty"
        shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("metrics.*"))
    else:
        target, message = run_dir, "cannot plot to"
    assert message in cli_error(run(str(target), "--plot", str(out)))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
