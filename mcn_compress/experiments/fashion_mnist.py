"""The whole job on Fashion-MNIST: train a float model, convert it, fine-tune, measure.

Used by `mcn-compress quickstart` (`experiments.quickstart`) and
`benchmarks/fashion_mnist.py`. Everything runs offline
on Debian's ``dataset-fashion-mnist`` files (docs/design.md section 5) and on a CPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mcn_compress.defaults import CALIBRATION_IMAGES, CALIBRATION_STEPS
from mcn_compress.errors import PipelineStopped
from mcn_compress.formats.digest import file_digest
from mcn_compress.module_utils import conv_bits
from mcn_compress.training.recipe import Recipe, recipe_from_dict, recipe_to_dict
from mcn_compress.training.run_dir import LAST, EpochMetrics, read_history, run_finished
from mcn_compress.training.trainer import TrainCallbacks, Trainer, TrainResult

if TYPE_CHECKING:
    from mcn_compress.passes.calibration import CalibrationStep

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """Data and epochs shared by every variant of a comparison (same seed, same data)."""

    arch: str = "mcn_resnet_small"
    train_samples: int | None = 20000
    val_samples: int | None = None
    pretrain_epochs: int = 3
    epochs: int = 3
    batch_size: int = 128
    workers: int = 0
    seed: int = 0
    root: str | None = None
    augment: bool = False  # random crop + flip cost keep K=4 1.6 points (README)
    calibrate_images: int = CALIBRATION_IMAGES  # unlabeled training images after conversion
    calibrate_steps: int = CALIBRATION_STEPS  # label-free distillation steps; 0: BatchNorm only
    amp: str = "off"  # runtime.amp of every run: "bf16" where the CPU has native bf16 (cpu_amp)
    channels_last: bool = True  # runtime.channels_last: on 2 CPU cores a step takes 0.8x, an
    # evaluation 0.55x the time of the NCHW layout (mcn_resnet_small, docs/quickstart.md)


def cpu_amp() -> str:
    """``"bf16"`` when this CPU computes bfloat16 natively (`amp.cpu_has_bf16`: AVX512-BF16 or
    AMX; training steps then take about half the time), else ``"off"``."""
    from mcn_compress.amp import cpu_has_bf16

    return "bf16" if cpu_has_bf16() else "off"


@dataclass(frozen=True)
class Variant:
    """One fine-tuning setting: MCN options and loss/optimiser overrides."""

    label: str
    convert: dict[str, Any] | None  # None: keep training the float model
    loss: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)


# The recipe defaults that won the Fashion-MNIST benchmark (see README).
MCN_OPTIM: dict[str, Any] = {"optimizer": "adamw", "lr": 4e-3, "lr_mfilter": 2e-4}
MCN_LOSS: dict[str, Any] = {"theta": 1e-4, "lambda_center": 1e-2, "alpha": 0.5}
FLOAT_OPTIM: dict[str, Any] = {"optimizer": "adamw", "lr": 2e-3}
_VARIANT_FILE = "variant.json"  # a finished variant's result, beside its run
_WEIGHTS_DIGEST = "float_weights_sha256"  # in that file: the weights the run started from


def mcn_warmup_epochs(epochs: int) -> int:
    """Linear warmup for MCN fine-tuning: a fifth of the epochs, at least one when there are
    two or more (the freshly binarized convs start far from the float model they replace)."""
    return 0 if epochs < 2 else max(1, round(epochs / 5))


def _recipe(
    budget: Budget,
    run_dir: Path,
    epochs: int,
    convert: dict[str, Any] | None,
    weights: Path | None,
    loss: dict[str, Any],
    optim: dict[str, Any],
) -> Recipe:
    model: dict[str, Any] = {
        "name": budget.arch,
        "pretrained": False,
        "num_classes": 10,
        "in_chans": 1,
        "convert": convert or {"planes": 4},
    }
    if weights is not None:
        model["weights"] = str(weights)
    if loss.get("distill", 0) > 0:
        model["teacher"] = "original"  # the float model the MCN was converted from
    data: dict[str, Any] = {
        "dataset": "fashion_mnist",
        "batch_size": budget.batch_size,
        "workers": budget.workers,
        "train_samples": budget.train_samples,
        "val_samples": budget.val_samples,
        "augment": budget.augment,
    }
    if budget.root:
        data["root"] = budget.root
    return recipe_from_dict(
        {
            "model": model,
            "data": data,
            "optim": {"epochs": epochs, "schedule": "cosine", **optim},
            "loss": loss,
            "runtime": {
                "device": "auto",
                "seed": budget.seed,
                "amp": budget.amp,
                "channels_last": budget.channels_last,
            },
            "output": {"dir": str(run_dir)},
        },
        source="<pipeline>",
    )


def float_model(budget: Budget, weights: Path | None = None) -> torch.nn.Module:
    from mcn_compress.models import load_float_model

    return load_float_model(
        budget.arch, pretrained=False, weights=weights, num_classes=10, in_chans=1
    )


def _float_recipe(budget: Budget, run_dir: Path) -> Recipe:
    return _recipe(
        budget,
        run_dir,
        budget.pretrain_epochs,
        None,
        None,
        {"theta": 0.0, "lambda_center": 0.0},
        FLOAT_OPTIM,
    )


def float_run_finished(budget: Budget, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished float run of ``budget`` (`pretrain_float` reuses it)."""
    recipe = _float_recipe(budget, run_dir)
    return _same_recipe(run_dir, recipe) and run_finished(run_dir, budget.pretrain_epochs)


def pretrain_float(
    budget: Budget, run_dir: Path, callbacks: TrainCallbacks | None = None
) -> tuple[Path, list[EpochMetrics]]:
    """Train the float baseline, or reuse a finished run of the same recipe in ``run_dir``."""
    recipe = _float_recipe(budget, run_dir)
    if float_run_finished(budget, run_dir):
        _logger.info("reusing the float model in %s", run_dir)
        return run_dir / LAST, read_history(run_dir)
    trainer = Trainer(recipe, callbacks=callbacks, model=float_model(budget), overwrite=True)
    result = _fit(trainer)
    return run_dir / LAST, result.history


def _fit(trainer: Trainer) -> TrainResult:
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if result.stopped:
        raise PipelineStopped(
            f"stopped; the interrupted run is in {result.run_dir} (a finished float model is "
            "reused when the same command runs again)"
        )
    return result


@dataclass
class VariantResult:
    """Accuracy, size and speed of one variant after its fine-tuning epochs."""

    label: str
    top1: float
    top5: float
    conv_bits: int
    float_conv_bits: int
    images_per_sec: float
    after_conversion_top1: float | None
    run_dir: Path
    calibrated_top1: float | None = None  # after the label-free distillation, before training
    calibration_images: int = 0
    calibration_steps: int = 0


def finetune_variant(
    budget: Budget,
    variant: Variant,
    float_weights: Path,
    run_dir: Path,
    callbacks: TrainCallbacks | None = None,
    calibration_progress: Callable[[CalibrationStep], None] | None = None,
) -> VariantResult:
    """Fine-tune one variant from the float weights for ``budget.epochs`` epochs
    (``calibration_progress``: called during the calibration of an MCN variant).

    A finished run of the same resolved recipe (output folder aside) that started from the same
    float weights (same SHA-256, wherever the file now lies) in ``run_dir`` is reused, not
    trained again.
    """
    loss = (
        {**MCN_LOSS, **variant.loss}
        if variant.convert
        else {"theta": 0.0, "lambda_center": 0.0, **variant.loss}
    )
    mcn_optim = {**MCN_OPTIM, "warmup_epochs": mcn_warmup_epochs(budget.epochs)}
    optim = {**(mcn_optim if variant.convert else FLOAT_OPTIM), **variant.optim}
    recipe = _recipe(budget, run_dir, budget.epochs, variant.convert, float_weights, loss, optim)
    calibration = (budget.calibrate_images, budget.calibrate_steps) if variant.convert else (0, 0)
    reused = _finished_variant(run_dir, recipe, variant.label, calibration)
    if reused is not None:
        _logger.info("reusing the finished run in %s", run_dir)
        return reused
    (run_dir / _VARIANT_FILE).unlink(missing_ok=True)  # stale once a new run starts here
    if not variant.convert:
        model = float_model(budget, float_weights)
        trainer = Trainer(recipe, callbacks=callbacks, model=model, overwrite=True)
        start_top1 = calibrated_top1 = None
    else:
        trainer, start_top1, calibrated_top1 = _calibrated_trainer(
            budget, recipe, float_weights, callbacks, calibration_progress
        )
    result = _fit(trainer)
    last = result.history[-1]
    mcn_bits = conv_bits(trainer.model)
    float_bits = conv_bits(float_model(budget))  # the unwidened original, also for expand
    outcome = VariantResult(
        label=variant.label,
        top1=last.val_top1,
        top5=last.val_top5,
        conv_bits=mcn_bits,
        float_conv_bits=float_bits,
        images_per_sec=sum(m.images_per_sec for m in result.history) / len(result.history),
        after_conversion_top1=start_top1,
        run_dir=run_dir,
        calibrated_top1=calibrated_top1,
        calibration_images=calibration[0],
        calibration_steps=calibration[1],
    )
    _save_variant(outcome, float_weights)
    return outcome


def _calibrated_trainer(
    budget: Budget,
    recipe: Recipe,
    float_weights: Path,
    callbacks: TrainCallbacks | None,
    progress: Callable[[CalibrationStep], None] | None = None,
) -> tuple[Trainer, float, float | None]:
    """The trainer of an MCN variant and its top-1 right after conversion (BatchNorm
    recalibrated on ``budget.calibrate_images`` unlabeled training images) and after the
    label-free distillation from the float model (docs/design.md section 2.10; None when
    ``budget.calibrate_steps`` is 0)."""
    from mcn_compress.calibration_data import calibration_data
    from mcn_compress.passes.calibration import calibrate
    from mcn_compress.passes.convert import convert

    assert recipe.model.convert is not None
    teacher = float_model(budget, float_weights).eval()
    source = f"fashion_mnist:{budget.root}" if budget.root else "fashion_mnist"
    images = calibration_data(source, teacher, budget.calibrate_images, seed=budget.seed)
    model = convert(teacher, recipe.model.convert)
    calibrate(model, teacher, images)
    trainer = Trainer(recipe, callbacks=callbacks, model=model, overwrite=True)
    start_top1 = trainer.evaluate()[1]
    if not budget.calibrate_steps:
        return trainer, start_top1, None
    teacher.to(trainer.device)
    calibrate(trainer.model, teacher, images, steps=budget.calibrate_steps, progress=progress)
    return trainer, start_top1, trainer.evaluate()[1]


def _save_variant(result: VariantResult, float_weights: Path) -> None:
    from mcn_compress.formats.atomic import atomic_write

    data = {
        **asdict(result),
        "run_dir": str(result.run_dir),
        _WEIGHTS_DIGEST: file_digest(float_weights),
    }
    text = json.dumps(data, indent=2)
    atomic_write(result.run_dir / _VARIANT_FILE, lambda tmp: tmp.write_text(text))


def _same_recipe(run_dir: Path, recipe: Recipe, weights_digest: str | None = None) -> bool:
    """Whether the run in ``run_dir`` was trained with ``recipe`` (its output folder aside: the
    folder may have been moved or copied). ``weights_digest``, the SHA-256 of the weights file
    the run started from, lets ``model.weights`` match by content instead of by path, so a
    comparison moved together with its float model still counts as the same recipe."""
    import yaml

    from mcn_compress.training.safe_yaml import MAX_YAML_BYTES, load_yaml

    path = run_dir / "recipe.yaml"
    try:
        with path.open("rb") as handle:  # bounded: a larger file is refused by load_yaml
            saved = load_yaml(handle.read(MAX_YAML_BYTES + 1).decode("utf-8"), str(path))
    except (OSError, ValueError, yaml.YAMLError):  # ConfigError is a ValueError
        return False
    if not isinstance(saved, dict):
        return False
    wanted = recipe_to_dict(recipe)
    saved.get("output", {}).pop("dir", None)
    wanted["output"].pop("dir", None)
    weights = recipe.model.weights
    if weights_digest and weights and Path(weights).is_file():
        if file_digest(Path(weights)) != weights_digest:
            return False
        saved.get("model", {}).pop("weights", None)
        wanted["model"].pop("weights", None)
    return bool(saved == wanted)


def _finished_variant(
    run_dir: Path, recipe: Recipe, label: str, calibration: tuple[int, int] = (0, 0)
) -> VariantResult | None:
    """The saved result of a finished run of exactly ``recipe`` in ``run_dir``, after the
    same ``(calibration images, steps)``, else None."""
    try:
        data = json.loads((run_dir / _VARIANT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    digest = data.pop(_WEIGHTS_DIGEST, None)
    done = (data.get("calibration_images", 0), data.get("calibration_steps", 0))
    if done != calibration:
        return None
    if not _same_recipe(run_dir, recipe, digest) or not run_finished(run_dir, recipe.optim.epochs):
        return None
    try:
        return VariantResult(**{**data, "label": label, "run_dir": run_dir})
    except TypeError:  # written by another version
        return None
