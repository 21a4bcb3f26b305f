"""Fine-tuning loop: run directory, resume equality, Ctrl-C, NaN stop, schedule, 2-rank gloo."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from synthetic_run import synthetic_recipe
from typer.testing import CliRunner

from mcn_compress import load
from mcn_compress.cli import app
from mcn_compress.errors import TrainingDiverged
from mcn_compress.evaluate import topk_correct
from mcn_compress.training.optim import lr_factor
from mcn_compress.training.recipe import load_recipe, recipe_from_dict
from mcn_compress.training.run_dir import EpochMetrics
from mcn_compress.training.trainer import Trainer


class _Recorder:
    """Callbacks that record calls and can fire an action at a given (epoch, step)."""

    def __init__(self, at: tuple[int, int] | None = None, action: Any = None) -> None:
        self.at, self.action = at, action
        self.epoch = 0
        self.step = 0
        self.ends: list[EpochMetrics] = []

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.epoch, self.step = epoch, done

    def on_step(self, values: dict[str, float]) -> None:
        self.step += 1
        if self.at == (self.epoch, self.step):
            self.action()

    def on_eval_start(self, steps: int) -> None:
        pass

    def on_eval_step(self) -> None:
        pass

    def on_epoch_end(self, metrics: EpochMetrics, best: bool) -> None:
        self.ends.append(metrics)


def _strip_timing(rows: list[EpochMetrics]) -> list[dict[str, float]]:
    return [
        {k: v for k, v in vars(m).items() if k not in ("seconds", "images_per_sec")} for m in rows
    ]


def test_cli_run_directory(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(synthetic_recipe(tmp_path / "run")))
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            "--recipe",
            str(path),
            "--set",
            "optim.epochs=1",
            "--set",
            "optim.warmup_epochs=0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {
        "recipe.yaml",
        "metrics.jsonl",
        "metrics.csv",
        "last.pt",
        "best.pt",
    }
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert json.loads(result.stdout)["history"][0]["val_top1"] == rows[0]["val_top1"]
    assert load_recipe(run / "recipe.yaml").optim.epochs == 1
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "softmax", "filter", "center", "val_top1", "val_top5"} <= set(header)
    model = load(run / "last.pt")
    assert sum(1 for m in model.modules() if type(m).__name__ == "MCConv2d") == 8


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler for the test, whatever the suite was started with (under
    ``nohup ... &`` SIGINT starts ignored); the one found is put back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("default_sigint")
def test_resume_after_ctrl_c_matches_uninterrupted(tmp_path: Path) -> None:
    full = Trainer(recipe_from_dict(synthetic_recipe(tmp_path / "full")))
    expected = full.fit()
    expected_state = {k: v.clone() for k, v in full.model.state_dict().items()}
    full.close()

    spec = recipe_from_dict(synthetic_recipe(tmp_path / "cut"))
    stopper = _Recorder(at=(0, 2), action=lambda: os.kill(os.getpid(), signal.SIGINT))
    first = Trainer(spec, callbacks=stopper)
    result = first.fit()
    first.close()
    assert result.stopped and not result.history
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["train_state"]["step_in_epoch"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    resumed = Trainer(spec, resume=True)
    final = resumed.fit()
    resumed.close()
    assert not final.stopped
    assert _strip_timing(final.history) == _strip_timing(expected.history)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected_state[key]), key
    assert torch.equal(resumed.criterion.centers, full.criterion.centers)


def test_finetuning_learns_a_separable_task(tmp_path: Path) -> None:
    """An MCN trained from scratch on 4 well-separated synthetic classes: the training loss
    falls epoch by epoch and the validation top-1 ends far above chance (25%)."""
    recipe = synthetic_recipe(tmp_path / "run", epochs=3, lr=4e-3)
    recipe["data"].update(train_samples=384, val_samples=128)
    recipe["model"]["name"] = "mcn_resnet_tiny"
    trainer = Trainer(recipe_from_dict(recipe))
    try:
        history = trainer.fit().history
    finally:
        trainer.close()
    losses = [m.loss for m in history]
    assert losses[-1] < losses[0] * 0.7, losses
    assert history[-1].val_top1 >= 70.0, [m.val_top1 for m in history]


def test_nan_loss_stops_and_keeps_last_good(tmp_path: Path) -> None:
    spec = recipe_from_dict(synthetic_recipe(tmp_path / "run"))

    def poison() -> None:
        with torch.no_grad():
            trainer.model.get_classifier().weight.fill_(float("nan"))

    trainer = Trainer(spec, callbacks=_Recorder(at=(1, 1), action=poison))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2.*last\.pt"):
        trainer.fit()
    trainer.close()
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["train_state"]["epoch"] == 1
    assert all(
        torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point()
    )


def test_lr_schedule_matches_formulas() -> None:
    spec = recipe_from_dict(synthetic_recipe(Path("unused"), epochs=4, warmup_epochs=1))
    total, warm = 40, 10
    for step in range(total):
        if step < warm:
            expected = (step + 1) / warm
        else:
            expected = 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert lr_factor(step, total, warm, spec) == pytest.approx(expected)
    step_spec = recipe_from_dict(
        synthetic_recipe(
            Path("unused"), epochs=4, warmup_epochs=0, schedule="step", milestones=[2, 3]
        )
    )
    got = [lr_factor(s, 40, 0, step_spec) for s in (0, 19, 20, 29, 30, 39)]
    assert got == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_topk_correct_naive() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    # sample 0: top-1 hit; sample 1: target 2 is 2nd; sample 2: target 0 is 3rd
    assert topk_correct(logits, targets, (1, 2, 3)) == [1, 2, 3]


def test_resume_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(synthetic_recipe(tmp_path / "none")))
    result = CliRunner().invoke(app, ["finetune", "--recipe", str(path), "--resume"])
    assert result.exit_code == 1
    assert "cannot resume" in result.stderr and len(result.stderr.strip().splitlines()) == 1


WORKER = """
import sys, torch, torch.distributed as dist
from mcn_compress.training.recipe import load_recipe
from mcn_compress.training.trainer import Trainer
trainer = Trainer(load_recipe(sys.argv[1]))
trainer.fit()
centers = [torch.zeros_like(trainer.criterion.centers) for _ in range(2)]
dist.all_gather(centers, trainer.criterion.centers)
weights = [torch.zeros_like(trainer.model.fc.weight) for _ in range(2)]
dist.all_gather(weights, trainer.model.fc.weight.detach())
if dist.get_rank() == 0:
    ok = torch.equal(centers[0], centers[1]) and torch.equal(weights[0], weights[1])
    open(sys.argv[2], "w").write("same" if ok else "different")
trainer.close()
"""


def test_two_process_gloo(tmp_path: Path) -> None:
    recipe = synthetic_recipe(tmp_path / "run")
    recipe["optim"].update(epochs=1, warmup_epochs=0)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    verdict = tmp_path / "verdict.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(path),
            str(verdict),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[:6000]
    assert verdict.read_text() == "same"
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt",
        "last.pt",
        "metrics.csv",
        "metrics.jsonl",
        "recipe.yaml",
    ]


def test_finetune_a_converted_checkpoint_with_a_float_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`finetune m.pt --recipe R`: the recipe's float source (name, weights, convert) is
    dropped, its 1-epoch warmup is clamped for a 1-epoch run, the checkpoint is the parent."""
    monkeypatch.chdir(tmp_path)  # relative paths must not meet a user's earlier runs
    runner = CliRunner()
    ckpt = tmp_path / "m.pt"
    converted = runner.invoke(
        app,
        ["convert", "mcn_resnet_small", "--no-pretrained", "--num-classes", "4", "--in-chans",
         "1", "--calibrate-data", "synthetic", "--calibrate-images", "32",
         "--calibrate-steps", "2", "-o", str(ckpt), "-q"],
    )  # fmt: skip
    assert converted.exit_code == 0, converted.stderr
    recipe = synthetic_recipe(tmp_path / "run")
    recipe["model"]["weights"] = "runs/quickstart/float/last.pt"  # absent: must not matter
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    args = ["--recipe", str(path), "--set", "optim.epochs=1", "--set", "data.train_samples=32"]
    result = runner.invoke(app, ["finetune", str(ckpt), *args])
    assert result.exit_code == 0, result.stderr
    assert "replaces the recipe's model source" in result.stderr
    assert "not shorter than the run" in result.stderr
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["model"]["checkpoint"] == str(ckpt) and saved["model"]["name"] is None
    same = runner.invoke(
        app, ["finetune", *args, "--set", f"model.checkpoint={ckpt}", "--set",
              f"output.dir={tmp_path / 'run2'}", "-q"],
    )  # fmt: skip
    assert same.exit_code == 0, same.stderr
    missing = runner.invoke(app, ["finetune", str(tmp_path / "nope.pt"), *args])
    assert missing.exit_code == 1 and "no such file" in missing.stderr


def test_missing_quickstart_float_model_says_to_run_the_quickstart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the relative weights path must not find a user's quickstart
    recipe = synthetic_recipe(tmp_path / "run")
    recipe["model"]["weights"] = "runs/quickstart/float/last.pt"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["finetune", "--recipe", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "mcn-compress quickstart" in lines[-1], lines
