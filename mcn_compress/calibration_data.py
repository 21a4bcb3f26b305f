"""Unlabeled calibration images for `convert` (docs/design.md section 2.10): an image folder,
or the training split of a dataset the recipes know (labels ignored).

``source`` is a directory of images (read recursively with the model's eval preprocessing,
`data.UnlabeledImages`) or a dataset name: ``fashion_mnist`` (Debian's files),
``cifar10`` / ``cifar100`` (``NAME:ROOT``, torchvision layout under ROOT) or ``synthetic``.
Images are resized to ``input_hw`` when given (the size the weights were trained at), else
to the model's input size (timm's ``pretrained_cfg``), and normalised for the model's channel
count as in fine-tuning, without augmentation; the subset is a deterministic random one
(seeded). Batches come shuffled, in a new seeded order on every pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mcn_compress.data import UnlabeledImages, eval_transform, find_images, image_mode
from mcn_compress.defaults import CALIBRATION_IMAGES, default_batch
from mcn_compress.errors import ConfigError, DataError
from mcn_compress.module_utils import in_channels, resolve_input_shape
from mcn_compress.training.recipe import DataRecipe

#: dataset names accepted in place of a directory (``NAME`` or ``NAME:ROOT``)
CALIBRATION_DATASETS: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "synthetic")
SYNTHETIC_IMAGES = 2048  # how many synthetic images when no count is given


MAX_IMAGES = 1_000_000
"""Most calibration images (the default uses 2,048; BatchNorm statistics settle long before)."""


def check_image_count(count: int | None) -> None:
    """Refuse a calibration image count below 1 or above `MAX_IMAGES` (`ConfigError`); a
    source with fewer images gives all it has."""
    if count is not None and not 1 <= count <= MAX_IMAGES:
        raise ConfigError(
            f"--calibrate-images {count}: expected 1 to {MAX_IMAGES:,} images (the default "
            f"{CALIBRATION_IMAGES:,} is usually enough)"
        )


def default_batch_size(model: nn.Module, input_hw: tuple[int, int] | None = None) -> int:
    """The calibration batch of ``model`` at ``input_hw`` (default: its input size):
    `defaults.default_batch`, 32 for inputs up to 64x64 pixels (Fashion-MNIST, CIFAR), 16
    above (ImageNet sizes), so a distillation step costs seconds, not minutes."""
    height, width = input_hw or resolve_input_shape(model)[1:]
    return default_batch((height, width))


def _dataset(
    name: str,
    root: str | None,
    model: nn.Module,
    max_images: int | None,
    seed: int,
    input_hw: tuple[int, int] | None,
) -> Dataset[Any]:
    from mcn_compress.data import build_datasets

    size = (input_hw or resolve_input_shape(model)[1:])[0]
    count = max_images if max_images is not None or name != "synthetic" else SYNTHETIC_IMAGES
    recipe = DataRecipe(
        dataset=name,  # type: ignore[arg-type]
        root=root or None,
        image_size=max(size, 8),
        augment=False,
        train_samples=count,
        workers=0,
    )
    return build_datasets(recipe, model, seed=seed)[0]


def calibration_data(
    source: str | Path,
    model: nn.Module,
    max_images: int | None = CALIBRATION_IMAGES,
    batch_size: int | None = None,
    *,
    seed: int = 0,
    input_hw: tuple[int, int] | None = None,
) -> DataLoader[Any]:
    """Shuffled batches of at most ``max_images`` unlabeled images (all when None) from
    ``source`` (a directory or a dataset name, see the module docstring) for ``model``, at
    ``input_hw`` (default: the model's input size); ``batch_size`` defaults to
    `default_batch_size`.

    Raises `ConfigError` for a source that is neither, `DataError` for missing data.
    """
    check_image_count(max_images)
    batch_size = batch_size or default_batch_size(model, input_hw)
    if batch_size < 1:
        raise ConfigError(f"the calibration batch size must be >= 1, got {batch_size}")
    text = str(source)
    name, _, root = text.partition(":")
    if Path(text).is_dir():
        try:
            files = find_images(text)  # every image, so the subset is spread over the tree
        except FileNotFoundError as exc:
            raise DataError(str(exc)) from exc
        generator = torch.Generator().manual_seed(seed)
        if max_images is not None and max_images < len(files):
            pick = torch.randperm(len(files), generator=generator)[:max_images]
            files = [files[int(i)] for i in sorted(pick.tolist())]
        mode = image_mode(in_channels(model))
        dataset: Dataset[Any] = UnlabeledImages(files, eval_transform(model, input_hw), mode)
    elif name in CALIBRATION_DATASETS:
        dataset = _dataset(name, root, model, max_images, seed, input_hw)
    else:
        raise ConfigError(
            f"calibration data {text!r} is neither a directory nor a dataset name "
            f"({', '.join(CALIBRATION_DATASETS)}; cifar needs NAME:ROOT)"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
