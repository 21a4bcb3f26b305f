"""The quickstart pipeline on real Fashion-MNIST (tiny budget), and its missing-data error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mcn_compress import load
from mcn_compress.cli import app
from mcn_compress.data import build_datasets
from mcn_compress.fashion_mnist import DEBIAN_FASHION_MNIST
from mcn_compress.models import load_float_model
from mcn_compress.training.recipe import DataRecipe

needs_data = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist",
)
TINY = [
    "--arch",
    "mcn_resnet_tiny",
    "--train-samples",
    "256",
    "--pretrain-epochs",
    "1",
    "--epochs",
    "1",
    "--calibrate-images",
    "256",
    "--calibrate-steps",
    "10",
    "--val-samples",
    "1000",
]


def naive_top1(model: torch.nn.Module) -> float:
    """Top-1 (percent) of ``model`` on the quickstart's 1000 test images, image by image."""
    _, test = build_datasets(DataRecipe(dataset="fashion_mnist", val_samples=1000), model)
    hits = 0
    with torch.no_grad():
        for start in range(0, len(test), 500):
            items = [test[i] for i in range(start, min(start + 500, len(test)))]
            images = torch.stack([image for image, _ in items])
            labels = torch.tensor([label for _, label in items])
            hits += int((model(images).argmax(1) == labels).sum())
    assert len(test) == 1000
    return hits / 10


@needs_data
def test_quickstart_end_to_end_and_reuse(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--json", *TINY])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    packed = Path(data["packed"])
    assert packed == out / "model.mcn"
    assert data["packed_bytes"] == packed.stat().st_size
    assert data["compression"] == pytest.approx(data["float_bytes"] / data["packed_bytes"])
    assert data["compression"] > 10
    assert set(data["stage_seconds"]) == {"float", "calibrate", "finetune", "export"}
    model = load(packed).eval()
    assert type(model).__name__ == "SmallResNet"
    # the reported top-1 is the packed model's, on the chosen test images (a naive loop)
    assert data["mcn_top1"] == pytest.approx(naive_top1(model), abs=1e-6)
    float_run, mcn_run = out / "float" / "last.pt", out / "mcn" / "last.pt"
    # the float top-1 (taken from the float run's last evaluation) is the float weights' own;
    # one image in 1000 may flip between the channels-last and the plain layout
    original = load_float_model(
        "mcn_resnet_tiny", pretrained=False, weights=float_run, num_classes=10, in_chans=1
    )
    assert data["float_top1"] == pytest.approx(naive_top1(original.eval()), abs=0.1 + 1e-6)
    assert yaml.safe_load((out / "float" / "recipe.yaml").read_text())["data"]["augment"] is False
    float_stamp, mcn_stamp = float_run.stat().st_mtime_ns, mcn_run.stat().st_mtime_ns
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--json", *TINY])
    assert again.exit_code == 0, again.stderr
    assert float_run.stat().st_mtime_ns == float_stamp  # the float model was reused
    assert mcn_run.stat().st_mtime_ns == mcn_stamp  # same recipe, finished: reused too
    assert json.loads(again.stdout)["mcn_top1"] == data["mcn_top1"]
    # Moved as a whole (the MCN recipe names the float weights by their new path): still reused.
    out = out.rename(tmp_path / "moved")
    float_run, mcn_run = out / "float" / "last.pt", out / "mcn" / "last.pt"
    moved = CliRunner().invoke(app, ["quickstart", "--out", str(out), "-q", *TINY])
    assert moved.exit_code == 0, moved.stderr
    assert (float_run.stat().st_mtime_ns, mcn_run.stat().st_mtime_ns) == (float_stamp, mcn_stamp)
    # A different MCN recipe (K=2) must train again, from the same float model.
    other = CliRunner().invoke(app, ["quickstart", "--out", str(out), "-q", "-k", "2", *TINY])
    assert other.exit_code == 0, other.stderr
    assert float_run.stat().st_mtime_ns == float_stamp
    assert mcn_run.stat().st_mtime_ns != mcn_stamp
    assert load(mcn_run).get_submodule("stages.0.conv1").planes == 2
    # Other data settings (augmentation on) make a different float model: trained again.
    aug = CliRunner().invoke(app, ["quickstart", "--out", str(out), "-q", "--augment", *TINY])
    assert aug.exit_code == 0, aug.stderr
    assert float_run.stat().st_mtime_ns != float_stamp
    saved = yaml.safe_load((out / "float" / "recipe.yaml").read_text())
    assert saved["data"]["augment"] is True
    # A longer float pretraining leaves the MCN recipe as it was but changes the weights it
    # starts from (same path, new contents): the MCN run must not be reused.
    mcn_stamp = mcn_run.stat().st_mtime_ns
    longer = [*TINY]
    longer[longer.index("--pretrain-epochs") + 1] = "2"
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out), "-q", "--augment", *longer])
    assert again.exit_code == 0, again.stderr
    assert mcn_run.stat().st_mtime_ns != mcn_stamp


def test_quickstart_without_data_says_how_to_get_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["quickstart", "-q", "--out", str(tmp_path / "qs"), "--data-root", str(tmp_path), *TINY],
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install -y dataset-fashion-mnist" in lines[0]
