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
    check_data,
    check_label_count,
    default_num_classes,
    model_num_classes,
)
from mcn_compress.errors import CheckpointError, ConfigError, WeightsUnavailable
from mcn_compress.info import ModelSource, info_of
from mcn_compress.passes.calibrate import recalibrate_batchnorm
from mcn_compress.training.recipe import QUICKSTART_HINT, Recipe

_logger = logging.getLogger(__name__)

CALIBRATION_BATCHES = 20  # BN recalibration after on-the-fly conversion (issue: BN drift)

STUDENT_WEIGHTS_ADVICE = (
    "set model.weights to a local state dict (--set model.weights=FILE) or start from random "
    "weights (--set model.pretrained=false)"
)
"""What a recipe accepts instead of published weights that cannot be fetched."""
TEACHER_WEIGHTS_ADVICE = "set model.teacher to a local checkpoint or weights file"


def fit_classes(model: nn.Module, num_classes: int | None, origin: str) -> nn.Module:
    """``model``, or a copy with a new ``num_classes``-class classifier (`passes.head`) when
    ``num_classes`` is given and differs from its outputs; a warning says the new head is
    freshly initialised."""
    from mcn_compress.passes.head import replace_head

    outputs = model_num_classes(model)
    if num_classes is None or outputs == num_classes:
        return model
    _logger.warning(
        "model.num_classes %d: %s predicts %s classes; its classifier is replaced by a new "
        "%d-class one, freshly initialised (the rest keeps its weights)",
        num_classes,
        origin,
        outputs if outputs is not None else "another number of",
        num_classes,
    )
    return replace_head(model, num_classes)


def build_student(recipe: Recipe, num_classes: int | None) -> nn.Module:
    """The model to fine-tune: a converted checkpoint (with a new classifier when
    ``model.num_classes`` differs from its outputs), or a float model converted now."""
    from mcn_compress.formats.load import load
    from mcn_compress.models import load_float_model
    from mcn_compress.passes.convert import convert

    spec = recipe.model
    if spec.checkpoint is not None:
        return fit_classes(load(spec.checkpoint), spec.num_classes, spec.checkpoint)
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
    try:
        float_model = load_float_model(
            spec.name,
            pretrained=spec.pretrained,
            weights=spec.weights,
            num_classes=spec.num_classes or num_classes,
            in_chans=spec.in_chans,
        )
    except WeightsUnavailable as exc:
        raise exc.with_advice(STUDENT_WEIGHTS_ADVICE) from exc
    return convert(float_model.eval(), spec.convert)


def build_teacher(recipe: Recipe, student: nn.Module) -> nn.Module:
    """The float model for distillation: ``original`` rebuilds the student's float source.
    A teacher that predicts another number of classes than the student is refused."""
    teacher = recipe.model.teacher
    assert teacher is not None
    source = info_of(student).source
    try:
        model = _teacher_model(teacher, source)
    except WeightsUnavailable as exc:
        raise exc.with_advice(TEACHER_WEIGHTS_ADVICE) from exc
    ours, theirs = model_num_classes(student), model_num_classes(model)
    if None not in (ours, theirs) and ours != theirs:
        raise ConfigError(
            f"model.teacher {teacher} predicts {theirs} classes and the student {ours}: "
            "distillation compares the same classes; name a teacher trained on this data"
        )
    model.eval().requires_grad_(False)
    return model


def _teacher_model(teacher: str, source: ModelSource | None) -> nn.Module:
    from mcn_compress.formats.load import load
    from mcn_compress.models import load_float_model

    if teacher == "original":
        if source is None or source.weights is None:
            raise ConfigError(
                "model.teacher 'original' needs the float weights the MCN came from; the "
                "checkpoint records none (converted with --no-pretrained, or given a new "
                "classifier by model.num_classes): name a teacher"
            )
        weights = None if source.weights == "pretrained" else source.weights
        return load_float_model(
            source.display_name, pretrained=weights is None, weights=weights, **source.kwargs
        )
    if Path(teacher).is_file():
        try:
            return load(teacher)
        except CheckpointError:
            if source is None:
                raise
            return load_float_model(source.display_name, weights=teacher, **source.kwargs)
    return load_float_model(teacher, pretrained=True)


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


def check_classes(recipe: Recipe, data_classes: int | None) -> None:
    """Refuse a ``model.num_classes`` that differs from the number of classes of the data
    (when it is known without reading the data), before any model is built."""
    wanted = recipe.model.num_classes
    if wanted is None or data_classes is None or wanted == data_classes:
        return
    where = f" ({recipe.data.root}/train)" if recipe.data.dataset == "imagefolder" else ""
    raise ConfigError(
        f"model.num_classes is {wanted} but the {recipe.data.dataset} data{where} has "
        f"{data_classes} classes: set model.num_classes={data_classes}, or leave it out to "
        "take the data's"
    )


def prepare_student(
    recipe: Recipe, model: nn.Module | None, device: torch.device, *, recalibrate: bool
) -> tuple[nn.Module, int, Dataset[Any], Dataset[Any]]:
    """The student on ``device`` with its class count and training / validation sets.

    ``model`` (given by the caller) or the recipe's (`build_student`); a float model the recipe
    converts on the fly gets its BatchNorm recalibrated (`recalibrate_on`) unless
    ``recalibrate`` is False (a resumed run). The data is looked for before any model is
    built or fetched (`data.check_data`), and a class count that differs between the recipe,
    the model and the data is refused (`check_classes`, `data.check_label_count`).
    """
    check_data(recipe.data)
    data_classes = default_num_classes(recipe.data)
    check_classes(recipe, data_classes)
    num_classes = recipe.model.num_classes or data_classes
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
