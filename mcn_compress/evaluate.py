"""Top-k accuracy of a model on a dataset's validation split (shared by the trainer and report)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mcn_compress.errors import DataError, first_line
from mcn_compress.training.recipe import DataRecipe

#: ``progress(done, total)``: images evaluated so far out of the validation split's size
ProgressFn = Callable[[int, int], None]


def validation_set(
    model: nn.Module, data_cfg: DataRecipe, *, seed: int = 0, name: str = "the model"
) -> Dataset[Any]:
    """The validation split of ``data_cfg`` prepared for ``model`` (`data.build_datasets`).

    Raises `DataError` when the data is missing or has more classes than ``model`` (called
    ``name`` in the message) has outputs.
    """
    from mcn_compress.data import build_datasets, dataset_classes, model_num_classes

    _, val = build_datasets(data_cfg, model, seed=seed)
    outputs = model_num_classes(model)
    classes = len(dataset_classes(val))
    if outputs is not None and classes > outputs:
        raise DataError(
            f"{data_cfg.dataset} has {classes} classes but {name} predicts {outputs}: evaluate "
            f"on data with at most {outputs} classes"
        )
    return val


def accuracy(
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    batch_size: int = 128,
    workers: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` in eval mode on ``(image, label)`` items.

    ``progress(done, total)`` is called before the first batch and after each one. A label
    outside the model's outputs, or images the model cannot take, raise `DataError`.
    """
    from mcn_compress.evaluate import topk_correct

    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise DataError("the validation split is empty")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    was_training = model.training
    model.eval()
    seen = top1 = top5 = 0
    if progress is not None:
        progress(0, total)
    try:
        with torch.inference_mode():
            for images, targets in loader:
                try:
                    logits = model(images.to(device))
                except RuntimeError as exc:
                    raise DataError(
                        f"the model cannot run on images of shape {tuple(images.shape[1:])}: "
                        f"{first_line(exc)}"
                    ) from exc
                outputs = logits.shape[-1]
                bad = targets[(targets < 0) | (targets >= outputs)]
                if bad.numel():
                    raise DataError(
                        f"label {int(bad[0])} is out of range for a model with {outputs} outputs"
                    )
                hits = topk_correct(logits.float(), targets.to(logits.device), (1, 5))
                top1, top5 = top1 + hits[0], top5 + hits[1]
                seen += int(targets.shape[0])
                if progress is not None:
                    progress(seen, total)
    finally:
        model.train(was_training)
    return 100.0 * top1 / seen, 100.0 * top5 / seen


def evaluate_accuracy(
    model: nn.Module,
    data_cfg: DataRecipe,
    progress: ProgressFn | None = None,
    *,
    seed: int = 0,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on the validation split of ``data_cfg``.

    The split is `data.build_datasets`'s (capped to ``data_cfg.val_samples`` images, a subset
    chosen by ``seed``), read with ``data_cfg.batch_size`` and ``data_cfg.workers``. A dataset
    with more classes than the model has outputs raises `DataError` before any image is read.

    Example:
        >>> top1, top5 = evaluate_accuracy(model, DataRecipe(dataset="fashion_mnist"))
    """
    val = validation_set(model, data_cfg, seed=seed)
    return accuracy(
        model, val, batch_size=data_cfg.batch_size, workers=data_cfg.workers, progress=progress
    )


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """How many samples have their target among the top-k logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(targets[:, None])
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]
