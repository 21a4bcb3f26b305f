"""Input data: unlabeled image folders for BatchNorm calibration.

Images are read with PIL and transformed with the model's own eval preprocessing
(timm's `resolve_data_config` + `create_transform`), so calibration sees what the model sees.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def find_images(root: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under ``root`` (recursively, sorted), at most ``limit``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration data directory {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(
            f"no images found under {root} (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return files[:limit] if limit is not None else files


class UnlabeledImages(Dataset[torch.Tensor]):
    """A list of image files as transformed tensors (no labels)."""

    def __init__(
        self, files: list[Path], transform: Callable[[Any], torch.Tensor], mode: str
    ) -> None:
        self.files = files
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return self.transform(image.convert(self.mode))


def eval_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """The model's eval preprocessing: timm's pretrained config, or ImageNet defaults."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    return create_transform(**config, is_training=False)


def calibration_loader(
    root: str | Path, model: nn.Module, max_images: int = 256, batch_size: int = 32
) -> DataLoader[torch.Tensor]:
    """Batches of up to ``max_images`` unlabeled images from ``root`` for BN recalibration."""
    files = find_images(root, limit=max_images)
    in_chans = int(getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None:
        in_chans = first.in_channels
    dataset = UnlabeledImages(files, eval_transform(model), "L" if in_chans == 1 else "RGB")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
