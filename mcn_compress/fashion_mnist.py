"""Fashion-MNIST from its four IDX files, offline (docs/design.md section 5): where they are
(Debian's ``dataset-fashion-mnist`` folder or torchvision's layout) and the two splits as
in-memory datasets (`ArrayImages`; `NormalizedArrayImages` at the native size without
augmentation, read with tensor ops instead of PIL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mcn_compress.errors import DataError
from mcn_compress.idx import read_idx

Sample = tuple[torch.Tensor, int]


#: where Debian's ``dataset-fashion-mnist`` package installs the four IDX files
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def find_fashion_mnist(root: str | Path | None = None) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files (``.gz`` or not) under ``root``.

    Looks in ``root`` itself (Debian's flat folder; ``root`` defaults to
    `DEBIAN_FASHION_MNIST`) and in torchvision's ``root/FashionMNIST/raw``.
    """
    base = Path(root).expanduser() if root is not None else DEBIAN_FASHION_MNIST
    candidates = [base, base / "FashionMNIST" / "raw", base / "fashion-mnist"]
    for folder in candidates:
        found: dict[str, Path] = {}
        for key, stem in FASHION_MNIST_FILES.items():
            for name in (f"{stem}.gz", stem):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"Fashion-MNIST not found: looked for {', '.join(FASHION_MNIST_FILES.values())} "
        f"(.gz or not) in {looked}. Install Debian's copy with "
        f"`apt-get install -y dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST}), or "
        "set data.root to a folder holding the four IDX files"
    )


class ArrayImages(Dataset[Sample]):
    """Images held in memory as a uint8 tensor ``(N, H, W)`` or ``(N, H, W, C)`` with labels;
    each item is ``(transform(PIL image), label)``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Sample:
        from PIL import Image

        image = Image.fromarray(self.images[index].numpy())
        data = self.transform(image) if self.transform is not None else image
        return data, int(self.labels[index])


class NormalizedArrayImages(ArrayImages):
    """`ArrayImages` at their stored size without augmentation, converted and normalised with
    tensor ops instead of PIL: the same values as ``ToMode``, ``ToTensor`` and ``Normalize``
    (``(x / 255 - mean) / std``, a gray image repeated for each of the ``in_chans`` channels),
    about ten times faster per image; a batch is read in one indexing step (``__getitems__``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__(images, labels, classes)
        if images.ndim != 3 or in_chans not in (1, 3) or len(mean) != in_chans:
            raise DataError(
                f"expected gray images (N, H, W) and 1 or 3 channels, got "
                f"{tuple(images.shape)} for {in_chans} channels"
            )
        self.in_chans = in_chans
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def _batch(self, indices: Sequence[int]) -> torch.Tensor:
        pixels = self.images[list(indices)].unsqueeze(1).to(torch.float32).div(255)
        pixels = pixels.expand(-1, self.in_chans, -1, -1)
        return pixels.sub(self.mean).div(self.std)

    def __getitem__(self, index: int) -> Sample:
        return self._batch([index])[0], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        images = self._batch(indices)
        return list(zip(images.unbind(0), self.labels[list(indices)].tolist(), strict=True))


def load_fashion_mnist(
    root: str | Path | None,
    train: bool,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> ArrayImages:
    """The Fashion-MNIST train (60k) or test (10k) split from its IDX files (`read_idx`)."""
    files = find_fashion_mnist(root)
    prefix = "train" if train else "val"
    images = read_idx(files[f"{prefix}_images"])
    labels = read_idx(files[f"{prefix}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or images.dtype != torch.uint8:
        raise DataError(
            f"{files[f'{prefix}_images']}: expected uint8 images (N, H, W) and labels (N,), got "
            f"{tuple(images.shape)} {images.dtype} and {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{files[f'{prefix}_labels']}: expected {images.shape[0]} integer labels, got "
            f"{labels.shape[0]} {str(labels.dtype).removeprefix('torch.')}"
        )
    bad = labels[(labels < 0) | (labels >= len(FASHION_MNIST_CLASSES))]
    if bad.numel():
        raise DataError(
            f"{files[f'{prefix}_labels']}: label {int(bad[0])} out of range (expected 0 to "
            f"{len(FASHION_MNIST_CLASSES) - 1})"
        )
    return ArrayImages(images, labels, FASHION_MNIST_CLASSES, transform)
