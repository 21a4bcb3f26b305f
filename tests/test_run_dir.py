"""Tests of `mcn_compress.training.run_dir` as `report` reads runs back: the checkpoint it
reports, the numbers of its ``metrics.jsonl`` and float runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from report_helpers import (
    metrics_rows,
    naive_accuracy,
)

from mcn_compress import (
    CheckpointError,
    info_of,
    load_float_model,
)
from mcn_compress.data import SyntheticImages
from mcn_compress.report_paths import profile_paths
from mcn_compress.training.recipe import DataRecipe
from mcn_compress.training.run_dir import FLOAT_FORMAT, EpochMetrics


def test_directory_without_run_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match=r"not a fine-tuning run: expected best\.pt or last"):
        profile_paths([tmp_path])


def test_run_dir_reports_its_best_checkpoint_and_metrics(run_dir: Path) -> None:
    rows = metrics_rows(run_dir)
    float_row, row = profile_paths([run_dir])
    assert float_row.kind == "float" and float_row.run_dir is None
    assert float_row.run_best_top1 is None and float_row.top1 is None
    assert row.label == row.run_dir == str(run_dir)
    assert row.path == str(run_dir / "best.pt")
    assert row.input_bytes == (run_dir / "best.pt").stat().st_size
    assert row.run_epochs == len(rows) == 2
    assert row.run_final_top1 == rows[-1]["val_top1"]
    assert row.run_best_top1 == max(r["val_top1"] for r in rows)
    direct = profile_paths([run_dir / "best.pt"])[1]
    for key in ("binary_params", "float_params", "packed_bytes", "min_bytes"):
        assert getattr(row, key) == getattr(direct, key), key


def test_run_dir_evaluated_with_its_data_reproduces_its_best_val_top1(run_dir: Path) -> None:
    """Same data settings and the run's seed (from recipe.yaml): the very images the run
    validated on, so best.pt scores the best val_top1 of metrics.jsonl."""
    data = DataRecipe(dataset="synthetic", image_size=28, batch_size=32, workers=0, val_samples=64)
    calls: list[tuple[str, int, int]] = []
    float_row, row = profile_paths([run_dir], data=data, progress=lambda *args: calls.append(args))
    assert row.top1 == pytest.approx(max(r["val_top1"] for r in metrics_rows(run_dir)))
    assert row.top5 == 100.0  # 4 classes
    assert (row.eval_dataset, row.eval_samples) == ("synthetic", 64)
    assert float_row.top1 is None and float_row.eval_dataset is None  # random weights: not run
    assert calls[0] == (str(run_dir), 0, 64) and calls[-1] == (str(run_dir), 64, 64)


def test_run_dir_without_best_falls_back_to_last(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("best.pt", "metrics.*"))
    row = profile_paths([copy])[1]
    assert row.path == str(copy / "last.pt")
    assert row.run_dir == str(copy)
    assert (row.run_epochs, row.run_final_top1, row.run_best_top1) == (None, None, None)


def test_float_run_dir_is_one_float_row(tmp_path: Path) -> None:
    """A float fine-tuning run (hand-written best.pt in the float-run format, metrics.jsonl)."""
    torch.manual_seed(0)
    model = load_float_model("mcn_resnet_small", pretrained=False, num_classes=4, in_chans=1)
    run = tmp_path / "float-run"
    run.mkdir()
    torch.save(
        {
            "format": FLOAT_FORMAT,
            "version": 1,
            "model": info_of(model).source.to_dict(),
            "state_dict": model.state_dict(),
            "metadata": {"metrics": {}},
        },
        run / "best.pt",
    )
    zeros = dict.fromkeys(EpochMetrics.__dataclass_fields__, 0.0)
    rows = [{**zeros, "epoch": 1, "val_top1": 62.5}, {**zeros, "epoch": 2, "val_top1": 50.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataRecipe(dataset="synthetic", image_size=28, batch_size=16, workers=0, val_samples=24)
    (row,) = profile_paths([run], data=data)
    assert row.kind == "float" and row.label == str(run)
    assert (row.run_epochs, row.run_final_top1, row.run_best_top1) == (2, 50.0, 62.5)
    reference = SyntheticImages(24, 4, 1, 28, seed=0, split="val")  # no recipe.yaml: seed 0
    assert row.top1 == pytest.approx(naive_accuracy(model, reference, 1))


def test_bad_metrics_line_is_named(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with (copy / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl:3 is not valid JSON"):
        profile_paths([copy])
