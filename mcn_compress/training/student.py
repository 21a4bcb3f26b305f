"""Building the model to fine-tune (the student) and the float teacher for distillation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mcn_compress.data import (
    build_datasets,
    check_label_count,
    default_num_classes,
    model_num_classes,
)
from mcn_compress.errors import CheckpointError, ConfigError
from mcn_compress.info import info_of
from mcn_compress.passes.calibrate import recalibrate_batchnorm
from mcn_compress.training.recipe import QUICKSTART_HINT, Recipe

_logger = logging.getLogger(__name__)

CALIBRATION_BATCHES = 20  # BN recalibration after on-the-fly conversion (issue: BN drift)


def build_student(recipe: Recipe, num_classes: int | None) -> nn.Module:
    """The model to fine-tune: a converted checkpoint, or a float model converted now."""
    from mcn_compress.formats.load import load
    from mcn_compress.models import load_float_model
    from mcn_compress.passes.convert import convert

    spec = recipe.model
    if spec.checkpoint is not None:
        return load(spec.checkpoint)
    assert spec.name is not None and spec.convert is not None
    if spec.weights is not None and not Path(spec.weights).is_file():
        hint = (
            ": it is the float model `mcn-compress quickstart` trains; run `mcn-compress "
            "quickstart` first (or set model.weights)"
            if QUICKSTART_HINT in Path(spec.weights).as_posix()
            else ""
        )
        raise ConfigError(
            f"model.weights {spec.weights}: no such file (looked in the current folder and the "
            f"recipe's folder){hint}"
        )
    float_model = load_float_model(
        spec.name,
        pretrained=spec.pretrained,
        weights=spec.weights,
        num_classes=spec.num_classes or num_classes,
        in_chans=spec.in_chans,
    )
    return convert(float_model.eval(), spec.convert)


def build_teacher(recipe: Recipe, student: nn.Module) -> nn.Module:
    """The float model for distillation: ``original`` rebuilds the student's float source."""
    from mcn_compress.formats.load import load
    from mcn_compress.models import load_float_model

    teacher = recipe.model.teacher
    assert teacher is not None
    source = info_of(student).source
    if teacher == "original":
        if source is None or source.weights is None:
            raise ConfigError(
                "model.teacher 'original' needs the float weights the MCN came from; the "
                "checkpoint records none (converted with --no-pretrained?): name a weights file"
            )
        weights = None if source.weights == "pretrained" else source.weights
        model = load_float_model(
            source.display_name, pretrained=weights is None, weights=weights, **source.kwargs
        )
    elif Path(teacher).is_file():
        try:
            model = load(teacher)
        except CheckpointError:
            if source is None:
                raise
            model = load_float_model(source.display_name, weights=teacher, **source.kwargs)
    else:
        model = load_float_model(teacher, pretrained=True)
    model.eval().requires_grad_(False)
    return model


def recalibrate_on(
    model: nn.Module, dataset: Dataset[Any], batch_size: int, device: torch.device
) -> int:
    """Re-estimate the BatchNorm statistics of a freshly converted ``model`` on the first
    `CALIBRATION_BATCHES` batches of ``dataset`` (in order; the global RNG is left as it was).
    Returns the number of images seen."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    gen_state = torch.get_rng_state()
    seen = recalibrate_batchnorm(
        model, ((x.to(device), y) for x, y in loader), max_batches=CALIBRATION_BATCHES
    )
    torch.set_rng_state(gen_state)
    _logger.info("recalibrated BatchNorm on %d training images after conversion", seen)
    return seen


def prepare_student(
    recipe: Recipe, model: nn.Module | None, device: torch.device, *, recalibrate: bool
) -> tuple[nn.Module, int, Dataset[Any], Dataset[Any]]:
    """The student on ``device`` with its class count and training / validation sets.

    ``model`` (given by the caller) or the recipe's (`build_student`); a float model the recipe
    converts on the fly gets its BatchNorm recalibrated (`recalibrate_on`) unless
    ``recalibrate`` is False (a resumed run). Labels beyond the model's outputs are refused.
    """
    num_classes = recipe.model.num_classes or default_num_classes(recipe.data)
    student = model if model is not None else build_student(recipe, num_classes)
    classes = model_num_classes(student) or num_classes
    if classes is None:
        raise ConfigError("cannot tell the number of classes: set model.num_classes")
    train_set, val_set = build_datasets(recipe.data, student, seed=recipe.runtime.seed)
    check_label_count(train_set, classes)
    student.to(device)
    if model is None and recipe.model.name is not None and recalibrate:
        recalibrate_on(student, train_set, recipe.data.batch_size, device)
    if recipe.runtime.channels_last:
        student.to(memory_format=torch.channels_last)
    return student, classes, train_set, val_set
