"""``runtime.compile``: compiled fine-tuning runs against eager runs from the same seed (the
reference), checkpoints of compiled runs in eager models, resume across the switch, the
clear error when the backend cannot compile, and the recipe keys.

Two comparisons, because two things can go wrong:
- the maths (what dynamo captures and AOTAutograd differentiates: the sign estimator, the
  classifier hook, the centre update, the eval weights): with the ``aot_eager`` backend the
  compiled graphs run the same ATen kernels as eager, so a whole run must match bit for bit;
- inductor's kernels, which fuse the step and sum in another order, so each float32 reduction
  may differ by a few ulps. On the tiny MCN below, 4 SGD steps and one evaluation measured:
  losses 2e-7 apart (relative), parameters within 8% of the ``rtol=1e-3, atol=1e-5`` bound
  (the worst are BatchNorm biases, whose gradients are sums that nearly cancel). Losses are
  checked to 1e-5 and parameters to that bound: a wrong term (the centre update before the
  centre term, a lost filter term) moves them by 1e-3 or more. AdamW is not used there: it
  divides each gradient element by its own size, so rounding in near-zero gradients becomes
  lr-sized steps (mcn_resnet_small, first epoch of 4 steps: train losses 0.3% apart with
  AdamW, 6e-7 with SGD).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from synthetic_run import synthetic_recipe
from timm.models import register_model
from torch import nn

import mcn_compress.training.compile as compile_mod
from mcn_compress import MCNConfig, convert, load, load_float_model
from mcn_compress.errors import ConfigError
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.training.compile import compile_module, compiled, is_compiled
from mcn_compress.training.recipe import (
    RuntimeRecipe,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from mcn_compress.training.run_dir import recipe_changes
from mcn_compress.training.trainer import Trainer

TIMING = ("seconds", "images_per_sec")


class _TinyNet(nn.Module):
    """A float conv stem, one convertible conv, BatchNorm, pooling and a linear head: the ops
    of the real models at a fraction of inductor's compile time."""

    def __init__(self, num_classes: int = 4, in_chans: int = 1, **_: Any) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        )
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))

    def get_classifier(self) -> nn.Module:
        return self.fc


@register_model
def mcn_test_compile_tiny(pretrained: bool = False, **kwargs: Any) -> _TinyNet:
    """`_TinyNet`, registered with timm so that its checkpoints rebuild by name."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return _TinyNet(**kwargs)


def _recipe(run_dir: Path, *, compile: bool, **optim: Any) -> dict[str, Any]:
    recipe = synthetic_recipe(run_dir, **optim)
    recipe["runtime"]["compile"] = compile
    return recipe


def _fit(recipe: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    trainer = Trainer(recipe_from_dict(recipe), **kwargs)
    try:
        result = trainer.fit()
        return {
            "rows": [{k: v for k, v in vars(m).items() if k not in TIMING} for m in result.history],
            "state": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "centers": trainer.criterion.centers.clone(),
            "compiled": is_compiled(trainer.model) and is_compiled(trainer.criterion),
        }
    finally:
        trainer.close()


def _tiny_model() -> nn.Module:
    torch.manual_seed(5)
    float_model = load_float_model("mcn_test_compile_tiny", pretrained=False)
    model = convert(float_model.eval(), MCNConfig(planes=4))
    assert [type(model.conv)] == [MCConv2d]
    return model


# --- the maths: aot_eager runs are bit-identical to eager runs ---------------------------------
@pytest.fixture(scope="module")
def aot_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two epochs (8 AdamW steps, 2 evaluations) of the synthetic run, eager and compiled
    (aot_eager), and the graph breaks of the compiled one."""
    root = tmp_path_factory.mktemp("aot")
    eager = _fit(_recipe(root / "eager", compile=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compile_mod, "BACKEND", "aot_eager")
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        fast = _fit(_recipe(root / "compiled", compile=True))
        breaks = sum(counters["graph_break"].values())
        graphs = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
    return {"root": root, "eager": eager, "compiled": fast, "breaks": breaks, "graphs": graphs}


def test_compiled_run_is_the_eager_run_without_inductor(aot_runs: dict[str, Any]) -> None:
    eager, fast = aot_runs["eager"], aot_runs["compiled"]
    assert fast["compiled"] and not eager["compiled"]
    assert fast["rows"] == eager["rows"]
    assert fast["state"].keys() == eager["state"].keys()
    for key, value in eager["state"].items():
        assert torch.equal(fast["state"][key], value), key
    assert torch.equal(fast["centers"], eager["centers"])
    # one graph each for the training forward, the loss and the evaluation forward, whole
    assert aot_runs["breaks"] == 0
    assert aot_runs["graphs"] == 3


def test_checkpoint_of_a_compiled_run_loads_into_an_eager_model(aot_runs: dict[str, Any]) -> None:
    root = aot_runs["root"]
    fast = torch.load(root / "compiled" / "last.pt", weights_only=True)
    slow = torch.load(root / "eager" / "last.pt", weights_only=True)
    assert list(fast["state_dict"]) == list(slow["state_dict"])
    assert not any("_orig_mod" in key for key in fast["state_dict"])
    assert list(fast["train_state"]["criterion"]) == ["centers", "seen"]
    model = load(root / "compiled" / "last.pt")
    assert not is_compiled(model)
    reference = load(root / "eager" / "last.pt")
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


class _StopAt:
    """Callbacks that ask ``trainer`` to stop after the given number of steps."""

    def __init__(self, steps: int) -> None:
        self.steps, self.seen = steps, 0
        self.trainer: Trainer | None = None

    def on_step(self, values: dict[str, float]) -> None:
        self.seen += 1
        if self.seen == self.steps and self.trainer is not None:
            self.trainer.request_stop()

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None  # the other progress hooks


def test_resume_may_switch_compile(
    aot_runs: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An eager run stopped after 2 steps and resumed compiled (the recipe change is allowed)
    ends exactly where the uninterrupted eager run ends."""
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    stopper = _StopAt(2)
    trainer = Trainer(recipe_from_dict(_recipe(tmp_path, compile=False)), callbacks=stopper)
    stopper.trainer = trainer
    try:
        assert trainer.fit().stopped
    finally:
        trainer.close()
    rest = _fit(_recipe(tmp_path, compile=True), resume=True)
    torch._dynamo.reset()
    assert rest["compiled"]
    assert rest["rows"] == aot_runs["eager"]["rows"]
    for key, value in aot_runs["eager"]["state"].items():
        assert torch.equal(rest["state"][key], value), key


# --- inductor: the same metrics within float tolerance ---------------------------------------
def test_inductor_run_reaches_the_eager_metrics(tmp_path: Path) -> None:
    """4 SGD steps and one evaluation of a tiny MCN through inductor (see the module
    docstring for the tolerance)."""
    results = {}
    for name, on in (("eager", False), ("inductor", True)):
        recipe = _recipe(tmp_path / name, compile=on, epochs=1, warmup_epochs=0)
        recipe["optim"].update(optimizer="sgd", lr=0.05)
        torch._dynamo.reset()
        results[name] = _fit(recipe, model=_tiny_model())
    torch._dynamo.reset()
    eager, fast = results["eager"], results["inductor"]
    assert fast["compiled"]
    (mine,), (ref,) = fast["rows"], eager["rows"]
    for key, value in ref.items():
        assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    for key, value in eager["state"].items():
        torch.testing.assert_close(fast["state"][key], value, rtol=1e-3, atol=1e-5, msg=key)
    torch.testing.assert_close(fast["centers"], eager["centers"], rtol=1e-3, atol=1e-5)


class _Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sin() * 3.0 + 1.0  # a pointwise kernel: inductor writes and builds C++


def test_backend_failure_says_to_turn_compile_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no kernel built before
    torch._dynamo.reset()
    layer = compile_module(_Sine(), "default", "model _Sine")
    with pytest.raises(ConfigError, match=r"set runtime\.compile: false") as info:
        layer(torch.randn(2, 3))
    assert "model _Sine" in str(info.value) and "C++ compiler" in str(info.value)
    torch._dynamo.reset()


def test_compile_is_logged_and_off_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny_model()
    criterion = nn.MSELoss()
    assert compiled(model, criterion, RuntimeRecipe()) is model and not is_compiled(model)
    with caplog.at_level(logging.INFO, logger="mcn_compress"):
        mode = RuntimeRecipe(compile=True, compile_mode="max-autotune-no-cudagraphs")
        assert compiled(model, criterion, mode) is model
    assert is_compiled(model) and is_compiled(criterion)
    lines = [r.getMessage() for r in caplog.records if "runtime.compile" in r.getMessage()]
    assert len(lines) == 1 and "on (mode max-autotune-no-cudagraphs)" in lines[0]
    assert list(model.state_dict()) == list(_tiny_model().state_dict())


# --- recipe ----------------------------------------------------------------------------------
def test_recipe_compile_keys(tmp_path: Path) -> None:
    recipe = recipe_from_dict(synthetic_recipe(tmp_path))
    assert recipe.runtime.compile is False and recipe.runtime.compile_mode == "default"
    data = synthetic_recipe(tmp_path)
    data["runtime"].update(compile="on", compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match=r"runtime\.compile: expected true or false, got .on."):
        recipe_from_dict(data)
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(synthetic_recipe(tmp_path)).replace("seed: 3", "seed: 3\n  compile: on")
    )
    loaded = load_recipe(path, ["runtime.compile_mode=max-autotune"])
    assert loaded.runtime.compile is True and loaded.runtime.compile_mode == "max-autotune"
    assert recipe_to_dict(loaded)["runtime"]["compile_mode"] == "max-autotune"
    assert recipe_from_dict(recipe_to_dict(loaded)) == loaded


def test_recipe_refuses_an_unknown_compile_mode(tmp_path: Path) -> None:
    data = synthetic_recipe(tmp_path)
    data["runtime"]["compile_mode"] = "fast"
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(data, source="r.yaml")
    assert str(info.value) == (
        "r.yaml: runtime.compile_mode: expected one of default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs, got 'fast' (str)"
    )
    with pytest.raises(ConfigError, match=r"--set runtime\.compile_mode=fast: expected one of"):
        apply_overrides(synthetic_recipe(tmp_path), ["runtime.compile_mode=fast"])


def test_resume_allows_compile_changes_only() -> None:
    saved = {"runtime": {"compile": False, "compile_mode": "default", "seed": 3}}
    now = {"runtime": {"compile": True, "compile_mode": "max-autotune", "seed": 3}}
    assert recipe_changes(saved, now) == []
    assert recipe_changes({"runtime": {"seed": 3}}, now) == []  # a run from before the keys
    assert recipe_changes(saved, {"runtime": {**now["runtime"], "seed": 4}}) == [
        "runtime.seed: 3 -> 4"
    ]


def test_timm_builds_the_test_model() -> None:
    assert isinstance(timm.create_model("mcn_test_compile_tiny"), _TinyNet)
    with torch.no_grad():
        assert math.isfinite(float(_tiny_model()(torch.randn(2, 1, 28, 28)).sum()))
