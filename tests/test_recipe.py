"""Tests of the recipe schema: errors name the file, key path and expectation; overrides;
the resolved dump round-trips; optimiser parameter groups; every shipped recipe validates.
"""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mcn_compress import ConfigError, MCNConfig, MCNError
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.training.optim import build_param_groups
from mcn_compress.training.recipe import (
    Recipe,
    apply_overrides,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))

MINIMAL = """
model:
  name: resnet18
data:
  dataset: synthetic
output:
  dir: runs/test
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def base() -> dict:
    return yaml.safe_load(MINIMAL)


def error_of(tmp_path: Path, data: dict) -> str:
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message
    return message


# --- shipped recipes -----------------------------------------------------------------------------
def test_recipes_folder_is_not_empty() -> None:
    names = {p.name for p in RECIPES}
    assert {"fashion-mnist.yaml", "cifar10.yaml", "imagenet.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.model.name is not None and isinstance(recipe.model.convert, MCNConfig)


def test_fashion_mnist_recipe_uses_the_benchmark_winners() -> None:
    """The shipped recipe and the quickstart/benchmark pipeline must not drift apart."""
    from mcn_compress.experiments.fashion_mnist import (
        MCN_LOSS,
        MCN_OPTIM,
        Budget,
        mcn_warmup_epochs,
    )

    recipe = load_recipe(next(p for p in RECIPES if p.name == "fashion-mnist.yaml"))
    assert recipe.data.augment is Budget().augment is False
    assert recipe.optim.optimizer == MCN_OPTIM["optimizer"]
    assert recipe.optim.lr == pytest.approx(MCN_OPTIM["lr"])
    assert recipe.optim.lr_mfilter == pytest.approx(MCN_OPTIM["lr_mfilter"])
    assert recipe.optim.warmup_epochs == mcn_warmup_epochs(recipe.optim.epochs)
    assert recipe.loss.theta == pytest.approx(MCN_LOSS["theta"])
    assert recipe.loss.lambda_center == pytest.approx(MCN_LOSS["lambda_center"])
    assert recipe.loss.alpha == pytest.approx(MCN_LOSS["alpha"])
    assert recipe.model.convert.planes == 4 and recipe.model.convert.width == "keep"


@pytest.mark.parametrize(("epochs", "warmup"), [(1, 0), (2, 1), (3, 1), (10, 2), (20, 4)])
def test_mcn_warmup_is_a_fifth_of_the_epochs(epochs: int, warmup: int) -> None:
    from mcn_compress.experiments.fashion_mnist import mcn_warmup_epochs

    assert mcn_warmup_epochs(epochs) == warmup


def test_imagenet_recipe_is_set_up_for_resnet18_imagefolder() -> None:
    recipe = load_recipe(next(p for p in RECIPES if p.name == "imagenet.yaml"))
    assert recipe.model.name == "resnet18" and recipe.model.num_classes is None  # the data's
    assert recipe.data.dataset == "imagefolder" and recipe.runtime.amp == "bf16"
    assert recipe.optim.lr_mfilter < recipe.optim.lr


# --- defaults --------------------------------------------------------------------------------
def test_minimal_recipe_gets_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.model.convert == MCNConfig()
    assert recipe.model.pretrained is True and recipe.model.checkpoint is None
    assert recipe.optim.lr_mfilter == pytest.approx(recipe.optim.lr / 10)
    assert recipe.runtime.amp == "off" and recipe.output.dir == "runs/test"


def test_step_schedule_default_milestones(tmp_path: Path) -> None:
    data = base()
    data["optim"] = {"schedule": "step", "epochs": 8}
    assert recipe_from_dict(data).optim.milestones == (4, 6)


def test_yaml_1_1_spellings_are_accepted(tmp_path: Path) -> None:
    text = MINIMAL + "optim:\n  lr: 1e-4\nruntime:\n  amp: off\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.optim.lr == pytest.approx(1e-4)
    assert recipe.runtime.amp == "off"


# --- errors --------------------------------------------------------------------------------
def test_unknown_key_names_file_path_and_choices(tmp_path: Path) -> None:
    data = base()
    data["optim"] = {"lrr": 0.1}
    message = error_of(tmp_path, data)
    assert "optim.lrr: unknown key" in message
    assert "did you mean optim.lr" in message


def test_unknown_top_level_section(tmp_path: Path) -> None:
    data = base()
    data["trainer"] = {}
    assert "trainer: unknown key" in error_of(tmp_path, data)


def test_wrong_type_names_expected_type(tmp_path: Path) -> None:
    data = base()
    data["data"]["batch_size"] = "big"
    data["runtime"] = {"channels_last": "yes please"}
    message = error_of(tmp_path, data)
    assert "2 problems" in message
    assert "data.batch_size: expected an integer, got 'big'" in message
    assert "runtime.channels_last: expected true or false" in message


def test_bool_is_not_an_integer_and_choice_is_checked(tmp_path: Path) -> None:
    data = base()
    data["optim"] = {"epochs": True, "optimizer": "adam"}
    message = error_of(tmp_path, data)
    assert "optim.epochs: expected an integer, got True" in message
    assert "optim.optimizer: expected one of sgd, adamw, got 'adam'" in message


def test_missing_required_values(tmp_path: Path) -> None:
    data = base()
    del data["data"]["dataset"]
    del data["output"]
    message = error_of(tmp_path, data)
    assert "data.dataset: missing required value" in message
    assert "output: missing required value" in message


def test_model_needs_exactly_one_of_checkpoint_and_name(tmp_path: Path) -> None:
    data = base()
    data["model"]["checkpoint"] = "model.pt"
    assert "model: expected exactly one of checkpoint" in error_of(tmp_path, data)
    data["model"] = {"pretrained": False}
    assert "model: expected exactly one of checkpoint" in error_of(tmp_path, data)
    data["model"] = {"checkpoint": "model.pt", "convert": {"planes": 2}}
    assert "model.convert: not allowed with checkpoint" in error_of(tmp_path, data)


def test_convert_options_are_validated_by_mcnconfig(tmp_path: Path) -> None:
    data = base()
    data["model"]["convert"] = {"planes": 0}
    message = error_of(tmp_path, data)
    assert "model.convert" in message and "planes" in message
    data["model"]["convert"] = {"planes": 2, "include": "layer1"}
    assert "model.convert.include: expected a list of strings" in error_of(tmp_path, data)


def test_range_and_cross_field_checks(tmp_path: Path) -> None:
    data = base()
    data["data"] = {"dataset": "cifar10"}
    data["optim"] = {"lr": 0.0}
    data["loss"] = {"distill": 0.5}
    message = error_of(tmp_path, data)
    assert "data.root: required for dataset cifar10" in message
    assert "optim.lr: expected a number > 0" in message
    data["data"] = {"dataset": "synthetic"}
    data["optim"] = {}
    assert "loss.distill: distillation needs model.teacher" in error_of(tmp_path, data)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_recipe(write(tmp_path, "", "empty.yaml"))


# --- overrides -------------------------------------------------------------------------------
def test_overrides_parse_values_like_yaml() -> None:
    data = base()
    before = copy.deepcopy(data)
    out = apply_overrides(
        data,
        [
            "optim.lr=0.01",
            "runtime.channels_last=true",
            "data.train_samples=100",
            "model.convert.planes=2",
            "model.convert.exclude=[layer4, fc]",
            "model.teacher=null",
        ],
    )
    assert data == before  # input not mutated
    assert out["optim"]["lr"] == 0.01 and out["runtime"]["channels_last"] is True
    assert out["model"]["convert"] == {"planes": 2, "exclude": ["layer4", "fc"]}
    recipe = recipe_from_dict(out)
    assert recipe.model.convert == MCNConfig(planes=2, exclude=("layer4", "fc"))
    assert recipe.data.train_samples == 100 and recipe.model.teacher is None


def test_later_override_wins_and_load_applies_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["optim.epochs=3", "optim.epochs=5", "data.dataset=fashion_mnist"])
    assert recipe.optim.epochs == 5 and recipe.data.dataset == "fashion_mnist"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=1", "unknown key optim.lrr (did you mean optim.lr?)"),
        ("trainer.x=1", "unknown key trainer"),
        ("optim.lr=fast", "expected a number, got 'fast'"),
        ("optim.lr.x=1", "optim.lr is a value, not a section"),
        ("optim.lr", "expected key.path=value"),
        ("data.dataset=mnist", "expected one of imagefolder"),
    ],
)
def test_bad_overrides(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(base(), [override])
    assert needle in str(info.value)


# --- dump -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_dump_round_trips(tmp_path: Path, path: Path) -> None:
    recipe = load_recipe(path, ["optim.lr=0.005"])
    out = dump_recipe(recipe, tmp_path / "resolved.yaml")
    again = load_recipe(out)
    assert again == recipe
    dumped = yaml.safe_load(out.read_text())
    assert dumped["optim"]["lr"] == 0.005
    assert dumped["runtime"]["amp"] == recipe.runtime.amp  # 'off' stays a string
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_dump_of_checkpoint_recipe_round_trips(tmp_path: Path) -> None:
    recipe = recipe_from_dict(
        {"model": {"checkpoint": "m.pt"}, "data": {"dataset": "synthetic"}, "output": {"dir": "x"}}
    )
    assert recipe.model.convert is None
    again = load_recipe(dump_recipe(recipe, tmp_path / "r.yaml"))
    assert again == recipe
    assert recipe_to_dict(again)["model"]["checkpoint"] == "m.pt"


def test_dump_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    with pytest.raises(MCNError):
        dump_recipe(recipe, tmp_path / "missing" / "r.yaml")


# --- parameter groups ---------------------------------------------------------------------------
def small_mcn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        MCConv2d(8, 8, 3, planes=4, bias=True),
        MCConv2d(8, 8, 1, planes=2, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_param_groups_split_decay_and_mfilter_rate() -> None:
    model = small_mcn()
    model[0].weight.requires_grad_(False)  # frozen: left out
    recipe = recipe_from_dict(
        apply_overrides(base(), ["optim.lr=0.1", "optim.lr_mfilter=0.02", "optim.weight_decay=0.5"])
    )
    groups = {g["name"]: g for g in build_param_groups(model, recipe)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    mcs = [m for m in model.modules() if isinstance(m, MCConv2d)]
    assert ids["mfilter"] == {id(m.mfilter) for m in mcs}
    assert ids["weights"] == {id(mcs[0].weight), id(mcs[1].weight), id(model[6].weight)}
    assert ids["no_decay"] == {
        id(model[1].weight),
        id(model[1].bias),
        id(mcs[0].bias),
        id(model[6].bias),
    }
    assert (groups["mfilter"]["lr"], groups["mfilter"]["weight_decay"]) == (0.02, 0.0)
    assert (groups["no_decay"]["lr"], groups["no_decay"]["weight_decay"]) == (0.1, 0.0)
    assert (groups["weights"]["lr"], groups["weights"]["weight_decay"]) == (0.1, 0.5)


def test_param_groups_decay_only_weights_in_an_optimizer_step() -> None:
    model = small_mcn()
    recipe = recipe_from_dict(apply_overrides(base(), ["optim.weight_decay=0.1"]))
    opt = torch.optim.SGD(build_param_groups(model, recipe.optim), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only weight decay moves anything
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"0.weight", "2.weight", "3.weight", "6.weight"}


# --- converted checkpoint replaces the model source; warmup clamp; relative paths -----------
@pytest.fixture(autouse=True)
def _library_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's `setup_logging` (run by other tests) stops propagation; undo it here."""
    import logging

    monkeypatch.setattr(logging.getLogger("mcn_compress"), "propagate", True)


def test_checkpoint_override_drops_the_float_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shipped = next(p for p in RECIPES if p.name == "fashion-mnist.yaml")
    with caplog.at_level("INFO", logger="mcn_compress"):
        recipe = load_recipe(shipped, ["model.checkpoint=m.pt", "optim.epochs=1"])
    assert recipe.model.checkpoint == "m.pt"
    assert recipe.model.name is None and recipe.model.weights is None
    assert recipe.model.convert is None and recipe.model.num_classes == 10
    lines = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert len(lines) == 1
    assert all(k in lines[0] for k in ("model.name", "model.weights", "model.convert"))
    assert recipe.optim.warmup_epochs == 0  # 1 epoch of warmup in a 1-epoch run: clamped


def test_name_override_drops_a_recipe_checkpoint(tmp_path: Path) -> None:
    data = base()
    data["model"] = {"checkpoint": "m.pt"}
    recipe = load_recipe(write(tmp_path, yaml.safe_dump(data)), ["model.name=resnet18"])
    assert recipe.model.name == "resnet18" and recipe.model.checkpoint is None


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mcn_compress.training.recipe import OptimRecipe

    with caplog.at_level("WARNING", logger="mcn_compress"):
        assert OptimRecipe(epochs=3, warmup_epochs=5).warmup_epochs == 2
    assert "not shorter than the run" in caplog.text
    with pytest.raises(ConfigError, match="warmup_epochs"):
        OptimRecipe(epochs=3, warmup_epochs=-1)


def test_relative_paths_resolve_against_cwd_then_recipe_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "w.pt").write_bytes(b"x")
    data = base()
    data["model"] = {"name": "resnet18", "weights": "w.pt", "teacher": "original"}
    path = write(folder, yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="mcn_compress"):
        recipe = load_recipe(path)
    assert recipe.model.weights == str(folder / "w.pt")
    assert "relative to the recipe's folder" in caplog.text
    (tmp_path / "w.pt").write_bytes(b"y")
    caplog.clear()
    with caplog.at_level("INFO", logger="mcn_compress"):
        assert load_recipe(path).model.weights == "w.pt"
    assert "relative to the current folder" in caplog.text
    # given on the command line: taken as it is, relative to the current folder
    assert load_recipe(path, ["model.weights=other.pt"]).model.weights == "other.pt"
