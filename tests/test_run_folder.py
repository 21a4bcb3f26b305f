"""A run folder belongs to one run (`training.run_dir.claim_run_dir`, the trainer and
``mcn-compress finetune``): no silent replacement, no second writer, no write over the
checkpoint a run starts from, and one-line errors for folders that cannot hold a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from synthetic_run import synthetic_recipe
from typer.testing import CliRunner

from mcn_compress.cli import app
from mcn_compress.errors import OutputError, RunFolderError, TrainingDiverged
from mcn_compress.training.recipe import recipe_from_dict
from mcn_compress.training.run_dir import RUN_FILES, claim_run_dir, recipe_changes
from mcn_compress.training.trainer import Trainer


def _finetune(recipe: dict[str, Any], tmp_path: Path, *options: str) -> Any:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    args = ["finetune", "--recipe", str(path), "--set", "optim.epochs=1"]
    return CliRunner().invoke(app, [*args, "--set", "optim.warmup_epochs=0", "-q", *options])


def _one_line(result: Any) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_finished_run_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe = synthetic_recipe(run)
    assert _finetune(recipe, tmp_path).exit_code == 0
    before = _stamps(run)
    line = _one_line(_finetune(recipe, tmp_path))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert _stamps(run) == before  # nothing written
    replaced = _finetune(recipe, tmp_path, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    after = _stamps(run)
    assert set(after) == set(before) and all(after[n] > before[n] for n in before)


def test_a_run_never_writes_over_the_checkpoint_it_starts_from(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert _finetune(synthetic_recipe(first), tmp_path).exit_code == 0
    best = first / "best.pt"
    content = best.read_bytes()
    recipe = synthetic_recipe(first)
    recipe["model"] = {"checkpoint": str(best)}
    for options in ((), ("--overwrite",)):
        line = _one_line(_finetune(recipe, tmp_path, *options))
        assert "inside its own output.dir" in line
    assert best.read_bytes() == content


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    spec = recipe_from_dict(synthetic_recipe(tmp_path / "run"))
    first = Trainer(spec)
    try:
        with pytest.raises(RunFolderError, match=rf"in use by .*pid {os.getpid()}"):
            Trainer(spec)
    finally:
        first.close()
    Trainer(spec, overwrite=True).close()  # free again once the first has closed


def test_folders_that_cannot_hold_a_run_fail_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "afile").write_text("x")
    for folder, words in (
        (tmp_path / "afile", "is a file"),
        (tmp_path / "afile" / "run", "cannot create"),
    ):
        with pytest.raises(OutputError, match=words):
            claim_run_dir(folder, resume=False, overwrite=False)
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    line = _one_line(_finetune(synthetic_recipe(tmp_path / "ro"), tmp_path))
    assert "cannot lock" in line and "Read-only" in line


def test_overwrite_removes_exactly_the_old_run_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in (*RUN_FILES, "notes.txt"):
        (run / name).write_text("old")
    claim_run_dir(run, resume=False, overwrite=True).release()
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_resume_refuses_damaged_unsafe_or_different_runs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe = synthetic_recipe(run)
    assert _finetune(recipe, tmp_path).exit_code == 0
    last = run / "last.pt"
    good = last.read_bytes()
    line = _one_line(
        _finetune({**recipe, "optim": {**recipe["optim"], "lr": 0.01}}, tmp_path, "--resume")
    )
    assert "optim.lr: 0.002 -> 0.01" in line
    other_k = {**recipe, "model": {**recipe["model"], "convert": {"planes": 2}}}
    assert "model.convert.planes: 4 -> 2" in _one_line(_finetune(other_k, tmp_path, "--resume"))
    last.write_bytes(good[: len(good) // 2])
    assert "cannot resume" in _one_line(_finetune(recipe, tmp_path, "--resume"))
    data = torch.load(run / "best.pt", weights_only=True)
    data["train_state"]["evil"] = _Payload()
    torch.save(data, last)
    line = _one_line(_finetune(recipe, tmp_path, "--resume"))
    assert "refused" in line and "weights_only" not in line


class _Payload:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("never runs",))


def test_recipe_changes_lists_nested_differences_but_not_resumable_ones() -> None:
    saved = {"optim": {"lr": 1, "epochs": 2}, "data": {"workers": 0, "batch_size": 8}}
    current = {"optim": {"lr": 2, "epochs": 5}, "data": {"workers": 4, "batch_size": 16}}
    assert recipe_changes(saved, current) == ["data.batch_size: 8 -> 16", "optim.lr: 1 -> 2"]


def test_a_loss_that_diverges_before_any_checkpoint_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(recipe_from_dict(synthetic_recipe(run)))
    with torch.no_grad():
        trainer.model.get_classifier().weight.fill_(float("nan"))
    try:
        with pytest.raises(TrainingDiverged, match="at epoch 1, step 1; no checkpoint was written"):
            trainer.fit()
    finally:
        trainer.close()
    assert not (run / "last.pt").exists()
