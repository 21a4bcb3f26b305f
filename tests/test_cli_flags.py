"""Every command takes ``--json`` (one JSON document on stdout, nothing else there) and
``-q/--quiet`` (nothing at all on success; an error is still one line on stderr); a finished
run extends to more epochs with ``--resume --set optim.epochs=N``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from synthetic_run import synthetic_recipe
from typer.testing import CliRunner

import mcn_compress.experiments.quickstart
from mcn_compress.cli import app


def _run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _silent(result: Any) -> None:
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def _one_json(result: Any) -> Any:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)  # the whole of stdout is one document


def _one_error(result: Any) -> str:
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_convert_export_report_json_and_quiet(files: dict[str, Any], tmp_path: Path) -> None:
    ckpt = str(files["ckpt"])
    out = tmp_path / "m.pt"
    _silent(_run("convert", "test_resnet", "--no-pretrained", "-o", str(out), "-q"))
    data = _one_json(_run("convert", "test_resnet", "--no-pretrained", "-o", str(out), "--json"))
    assert data["out"] == str(out) and data["planes"] == 4
    assert "Layers (K=4" in _run("convert", "test_resnet", "--no-pretrained", "-o", str(out)).stdout

    packed = tmp_path / "m.mcn"
    _silent(_run("export", ckpt, "-o", str(packed), "-q"))
    data = _one_json(_run("export", ckpt, "-o", str(packed), "--json", "-q"))
    assert data["bytes"] == packed.stat().st_size
    assert _run("export", ckpt, "-o", str(packed)).stdout.startswith(f"wrote {packed}")

    _silent(_run("report", ckpt, "-q"))
    as_json = _one_json(_run("report", ckpt, "--json"))
    assert as_json == _one_json(_run("report", ckpt, "--format", "json"))
    assert _one_json(_run("report", ckpt, "--json", "-q")) == as_json  # a format asked for
    assert as_json["models"][-1]["input_bytes"] == files["ckpt"].stat().st_size
    assert "--json" in _one_error(_run("report", ckpt, "--json", "--format", "csv"))
    assert "Model size (real files)" in _run("report", ckpt).stdout  # the table, no flag

    missing = str(tmp_path / "missing.pt")
    for args in (
        ("convert", "test_resnet", "--weights", missing, "-o", str(out)),
        ("export", missing, "-o", str(packed)),
        ("report", missing),
        ("finetune", "--recipe", str(tmp_path / "missing.yaml")),
    ):
        assert "missing" in _one_error(_run(*args, "-q"))


def test_finetune_quiet_json_and_extending_a_finished_run(tmp_path: Path) -> None:
    recipe = synthetic_recipe(tmp_path / "run", epochs=1)  # warmup_epochs 1, clamped to 0
    recipe["data"].update(train_samples=64, val_samples=32)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _silent(_run("finetune", "--recipe", str(path), "-q"))  # the clamp warning too is dropped
    data = _one_json(
        _run("finetune", "--recipe", str(path), "--resume", "--set", "optim.epochs=2", "--json")
    )
    assert [row["epoch"] for row in data["history"]] == [1, 2]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1, 2]
    # a value that changes the run is still refused, in the words the user wrote
    more = ["--set", "optim.epochs=3", "--set", "optim.warmup_epochs=2", "-q"]
    line = _one_error(_run("finetune", "-r", str(path), "--resume", *more))
    assert "optim.warmup_epochs: 1 -> 2" in line


def test_quickstart_json_and_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's own output (the pipeline, tested in test_quickstart.py, is stubbed)."""

    def pipeline(out_dir: Path, budget: Any, *args: Any, **kwargs: Any) -> Any:
        logging.getLogger("mcn_compress.experiments").warning("a warning -q must drop")
        return SimpleNamespace(
            float_top1=90.0,
            float_bytes=1000,
            mcn_top1=88.0,
            mcn_after_conversion_top1=None,
            mcn_calibrated_top1=None,
            packed_bytes=100,
            ratio=10.0,
            packed_path=out_dir / "model.mcn",
            checkpoint_path=out_dir / "mcn" / "best.pt",
            minutes=1.0,
            conv_bits=8,
            float_conv_bits=256,
            stage_seconds={"float": 1.0},
        )

    monkeypatch.setattr(mcn_compress.experiments.quickstart, "quickstart", pipeline)
    monkeypatch.setattr(mcn_compress.experiments.quickstart, "plan", lambda *args: [])
    out = str(tmp_path / "qs")
    _silent(_run("quickstart", "--out", out, "-q"))
    assert _one_json(_run("quickstart", "--out", out, "--json"))["mcn_top1"] == 88.0
    assert "88.00" in _run("quickstart", "--out", out).stdout
