"""``model.num_classes`` with a checkpoint gives it a new classifier (`passes.head`), and a
class count that differs between the recipe, the model and the data is refused both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import mcn_compress.models
from mcn_compress import MCNConfig, convert, info_of, load, load_float_model, save
from mcn_compress.cli import app
from mcn_compress.passes.head import replace_head
from mcn_compress.training.recipe import recipe_from_dict
from mcn_compress.training.trainer import Trainer

CLASSES = ("ant", "bee", "cow")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageNet-layout folder: 3 classes, 4 training and 2 validation images each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Converted test_resnet checkpoints predicting 1000 and 2 classes."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for classes in (1000, 2):
        model = load_float_model("test_resnet", pretrained=False, num_classes=classes)
        paths[classes] = save(convert(model.eval(), MCNConfig(planes=4)), root / f"m{classes}.pt")
    return paths


def _recipe(tmp_path: Path, folder: Path, **model: Any) -> Path:
    recipe = {
        "model": model,
        "data": {"dataset": "imagefolder", "root": str(folder), "image_size": 32},
        "optim": {"epochs": 1},
        "runtime": {"device": "cpu"},
        "output": {"dir": str(tmp_path / "run")},
    }
    recipe["data"].update(batch_size=6, workers=0)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _finetune(*args: str) -> Any:
    return CliRunner().invoke(app, ["finetune", *args])


def _one_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_new_head_keeps_every_other_weight(checkpoints: dict[int, Path], tmp_path: Path) -> None:
    model = load(checkpoints[1000])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = replace_head(model, 3)
    state = new.state_dict()
    assert state["fc.weight"].shape == (3, before["fc.weight"].shape[1])
    assert state["fc.bias"].shape == (3,)
    assert all(torch.equal(state[k], v) for k, v in before.items() if not k.startswith("fc."))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the same features reach both heads
        assert torch.equal(
            model.eval().forward_head(model.forward_features(x), pre_logits=True),
            new.eval().forward_head(new.forward_features(x), pre_logits=True),
        )
        assert new(x).shape == (2, 3)
        source = info_of(new).source
        assert source.kwargs["num_classes"] == 3 and source.weights is None
        again = load(save(new, tmp_path / "new.pt"))  # the description rebuilds it
        assert torch.equal(again.eval()(x), new(x))
    float_model = load_float_model("tv:squeezenet1_1", pretrained=False)  # a 1x1 conv head
    assert replace_head(float_model, 5).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_num_classes_with_a_checkpoint_trains_a_new_head(
    checkpoints: dict[int, Path], folder: Path, tmp_path: Path
) -> None:
    ckpt = str(checkpoints[1000])
    recipe = _recipe(tmp_path, folder, checkpoint=ckpt)
    line = _one_error(_finetune("--recipe", str(recipe), "-q"))  # a 1000-class head, 3 classes
    assert "3 classes but the model predicts 1000" in line and "model.num_classes=3" in line
    result = _finetune("--recipe", str(recipe), "--set", "model.num_classes=3")
    assert result.exit_code == 0, result.stderr
    assert "freshly initialised" in " ".join(result.stderr.split())
    best = load(tmp_path / "run" / "best.pt")
    assert best.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["model"]["num_classes"] == 3
    trainer = Trainer(
        recipe_from_dict({**saved, "output": {"dir": str(tmp_path / "again")}}), overwrite=True
    )
    try:  # the centre-loss buffer has one centre per class of the new head
        assert trainer.num_classes == 3 and trainer.criterion.centers.shape[0] == 3
    finally:
        trainer.close()


def test_more_classes_than_outputs_are_refused(
    checkpoints: dict[int, Path], folder: Path, tmp_path: Path
) -> None:
    recipe = _recipe(tmp_path, folder, checkpoint=str(checkpoints[2]))
    line = _one_error(_finetune("--recipe", str(recipe), "-q"))
    assert "3 classes but the model predicts 2" in line


def test_a_recipe_num_classes_that_is_not_the_datas_is_refused_before_any_model(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was built")

    monkeypatch.setattr(mcn_compress.models, "load_float_model", never)
    recipe = _recipe(tmp_path, folder, name="test_resnet", pretrained=False, num_classes=1000)
    line = _one_error(_finetune("--recipe", str(recipe)))
    assert "model.num_classes is 1000" in line and "has 3 classes" in line
