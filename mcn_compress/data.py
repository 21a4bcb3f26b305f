"""Input data: calibration images (unlabeled) and the labeled datasets of fine-tuning.

Calibration: unlabeled image folders, read with PIL and transformed with the model's own eval
preprocessing (timm's `resolve_data_config` + `create_transform`), so BatchNorm recalibration
sees what the model sees.

Fine-tuning (`build_datasets`, docs/design.md sections 3 and 5): ImageFolder trees with timm's
train / eval transforms; CIFAR-10/100 in torchvision's layout; Fashion-MNIST from its four IDX
files (`mcn_compress.fashion_mnist`: Debian's folder or torchvision's layout, parsed by `read_idx`);
a seeded synthetic set for smoke runs. Nothing is ever downloaded: missing data raises one
`DataError` that says where it looked and how to get the data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from mcn_compress.errors import DataError
from mcn_compress.fashion_mnist import (
    ArrayImages,
    NormalizedArrayImages,
    find_fashion_mnist,
    load_fashion_mnist,
)
from mcn_compress.images import ImageLoader, read_image
from mcn_compress.module_utils import in_channels

if TYPE_CHECKING:
    from mcn_compress.training.recipe import DataRecipe

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "fashion_mnist": 28, "synthetic": 32}
KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10}
SYNTHETIC_DEFAULT_SIZES = (1024, 256)

Sample = tuple[torch.Tensor, int]


# ------------------------------------------------------------------------------------------
# calibration images (unlabeled)
# ------------------------------------------------------------------------------------------
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
        return self.transform(read_image(self.files[index], self.mode))


def eval_transform(
    model: nn.Module, input_hw: tuple[int, int] | None = None
) -> Callable[[Any], torch.Tensor]:
    """The model's eval preprocessing of an image file, normalised for its channel count
    (`_normalization`): timm's pretrained config (resize, centre crop), or, with ``input_hw``
    (the size the model was trained at), a plain resize to it, as small images are read for
    training (`small_image_transform`)."""
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as T

    in_chans = in_channels(model)
    mean, std = _normalization(model, in_chans)
    if input_hw is not None:
        return T.Compose(
            [
                ToMode(image_mode(in_chans)),
                T.Resize(input_hw, interpolation=T.InterpolationMode.BILINEAR),
                T.ToTensor(),
                T.Normalize(list(mean), list(std)),
            ]
        )
    config = resolve_data_config({}, model=model)
    config.update(mean=mean, std=std, input_size=(in_chans, *config["input_size"][1:]))
    return create_transform(**config, is_training=False)


# ------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------
class SyntheticImages(Dataset[Sample]):
    """Seeded random images with a learnable class-dependent signal, for smoke runs.

    Class ``k`` has a smooth pattern ``P_k`` (a random 4x4 map per channel, upsampled);
    sample ``i`` is ``signal * P_{y_i} + noise * N(0, 1)`` with ``y_i`` drawn uniformly. Item
    ``i`` depends only on ``(seed, split, i)``, so any worker order gives the same data. The
    patterns depend only on ``seed``: train and val share them.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 10,
        in_chans: int = 3,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        signal: float = 1.0,
        noise: float = 1.0,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.classes = [f"class_{k}" for k in range(num_classes)]
        self.shape = (in_chans, image_size, image_size)
        self.seed = seed
        self.split = split
        self.signal = signal
        self.noise = noise
        gen = torch.Generator().manual_seed(seed)
        low = torch.randn(num_classes, in_chans, 4, 4, generator=gen)
        self.patterns = F.interpolate(
            low, size=(image_size, image_size), mode="bilinear", align_corners=False
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        # the CPU generator keeps only 32 bits of its seed: hash (seed, split, index) into them
        key = hashlib.blake2b(f"{self.seed}:{self.split}:{index}".encode(), digest_size=4)
        gen = torch.Generator().manual_seed(int.from_bytes(key.digest(), "big"))
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        image = self.signal * self.patterns[label] + self.noise * torch.randn(
            self.shape, generator=gen
        )
        return image, label


class LabeledSubset(Subset[Sample]):
    """`torch.utils.data.Subset` that keeps the dataset's ``classes``."""

    @property
    def classes(self) -> list[str]:
        return dataset_classes(self.dataset)


def dataset_classes(dataset: Dataset[Any]) -> list[str]:
    """Class names of a dataset built here (or any dataset with a ``classes`` list)."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise DataError(f"{type(dataset).__name__} does not list its classes")
    return list(classes)


def cap_dataset(dataset: Dataset[Sample], limit: int | None, seed: int = 0) -> Dataset[Sample]:
    """A deterministic random subset of ``limit`` samples (indices sorted); all if None."""
    size = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= size:
        return dataset
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randperm(size, generator=gen)[:limit].sort().values.tolist()
    return LabeledSubset(dataset, indices)


def model_num_classes(model: nn.Module) -> int | None:
    """Output classes of ``model``: timm's ``num_classes``, else the last Linear's outputs."""
    value = getattr(model, "num_classes", None)
    if isinstance(value, int) and value > 0:
        return value
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def default_num_classes(data_cfg: DataRecipe) -> int | None:
    """Classes of the configured dataset without loading it (None when it cannot tell)."""
    if data_cfg.dataset in KNOWN_CLASSES:
        return KNOWN_CLASSES[data_cfg.dataset]
    if data_cfg.dataset == "imagefolder" and data_cfg.root:
        train = Path(data_cfg.root).expanduser() / "train"
        if train.is_dir():
            return sum(1 for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    return None


# ------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------
class ToMode:
    """Convert a PIL image to mode ``"L"`` or ``"RGB"`` (picklable, for loader workers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Any) -> Any:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


def image_mode(in_chans: int) -> str:
    """The PIL mode of images for a model with ``in_chans`` input channels (1: ``L``, 3:
    ``RGB``); other counts are a `DataError`, since image files have 1 or 3 channels."""
    if in_chans not in (1, 3):
        raise DataError(
            f"the model takes {in_chans} input channels, but images have 1 (gray) or 3 (RGB); "
            "use a model with --in-chans 1 or 3 for image data"
        )
    return "L" if in_chans == 1 else "RGB"


def _normalization(model: nn.Module, in_chans: int) -> tuple[tuple[float, ...], ...]:
    """The model's mean / std (timm config, ImageNet by default), fitted to ``in_chans``."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    stats = []
    for values in (tuple(config["mean"]), tuple(config["std"])):
        if len(values) != in_chans:
            values = (float(np.mean(values)),) * in_chans
        stats.append(values)
    return stats[0], stats[1]


def small_image_transform(
    native: int,
    size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
) -> Callable[[Any], torch.Tensor]:
    """CIFAR-style pipeline: resize to ``size`` if needed; for training a padded random crop
    (padding ``size // 8``) and a horizontal flip; then tensor and normalisation.
    """
    from torchvision import transforms as T

    ops: list[Callable[[Any], Any]] = [ToMode(image_mode(in_chans))]
    if size != native:
        ops.append(T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR))
    if train:
        ops += [T.RandomCrop(size, padding=max(1, size // 8)), T.RandomHorizontalFlip()]
    ops += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)


def imagefolder_transforms(
    model: nn.Module, image_size: int | None, in_chans: int
) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """timm's train and eval transforms for ``model`` (`resolve_data_config`), at ``image_size``
    when given, with the normalisation fitted to ``in_chans``.
    """
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as T

    args: dict[str, Any] = {}
    if image_size is not None:
        args["input_size"] = (in_chans, image_size, image_size)
    config = resolve_data_config(args, model=model)
    config["input_size"] = (in_chans, *tuple(config["input_size"])[1:])
    config["mean"], config["std"] = _normalization(model, in_chans)
    mode = ToMode(image_mode(in_chans))
    train = T.Compose([mode, create_transform(**config, is_training=True)])
    val = T.Compose([mode, create_transform(**config, is_training=False)])
    return train, val


# ------------------------------------------------------------------------------------------
# build_datasets
# ------------------------------------------------------------------------------------------
def _imagefolder_root(data_cfg: DataRecipe) -> Path:
    """``data.root`` of an image folder dataset; `DataError` unless it holds train/ and val/."""
    root = Path(str(data_cfg.root)).expanduser()
    missing = [str(root / split) for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise DataError(
            f"image folder data not found: {', '.join(missing)} missing. Expected "
            f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (for ImageNet, sort the "
            "validation images into class folders first, e.g. with the usual valprep.sh)"
        )
    return root


def _cifar_root(data_cfg: DataRecipe) -> tuple[type[Any], Path]:
    """The torchvision class of a CIFAR dataset and the folder that holds its data."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if data_cfg.dataset == "cifar100" else CIFAR10
    root = Path(str(data_cfg.root)).expanduser()
    if root.name == cls.base_folder:  # the user pointed at the extracted folder itself
        root = root.parent
    return cls, root


def _cifar_missing(cls: type[Any], root: Path) -> DataError:
    """The error for CIFAR data missing (or corrupt) under ``root``."""
    label = "CIFAR-100" if cls.__name__ == "CIFAR100" else "CIFAR-10"
    archive = "cifar-100-python.tar.gz" if label == "CIFAR-100" else "cifar-10-python.tar.gz"
    return DataError(
        f"{label} not found or corrupt: looked for {root / cls.base_folder} (torchvision "
        f"layout). Download https://www.cs.toronto.edu/~kriz/{archive} and extract it into "
        f"{root}, or run torchvision.datasets.{cls.__name__}('{root}', download=True) on a "
        "machine with internet access"
    )


def check_data(data_cfg: DataRecipe) -> None:
    """Raise `DataError` when the data of ``data_cfg`` is not where it is looked for, without
    reading it: run before a model is built, so that no download or conversion is spent on
    a run that cannot start."""
    if data_cfg.dataset == "imagefolder":
        _imagefolder_root(data_cfg)
    elif data_cfg.dataset in ("cifar10", "cifar100"):
        cls, root = _cifar_root(data_cfg)
        if not (root / cls.base_folder).is_dir():
            raise _cifar_missing(cls, root)
    elif data_cfg.dataset == "fashion_mnist":
        find_fashion_mnist(data_cfg.root)


def _imagefolder(
    data_cfg: DataRecipe, model: nn.Module, in_chans: int
) -> tuple[Dataset[Sample], Dataset[Sample]]:
    from torchvision.datasets import ImageFolder

    root = _imagefolder_root(data_cfg)
    train_tf, val_tf = imagefolder_transforms(model, data_cfg.image_size, in_chans)
    if not data_cfg.augment:
        train_tf = val_tf
    try:
        train = ImageFolder(str(root / "train"), transform=train_tf, loader=ImageLoader())
        val = ImageFolder(str(root / "val"), transform=val_tf, loader=ImageLoader())
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"image folder data under {root} is unusable: {exc}") from exc
    if train.classes != val.classes:
        extra = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise DataError(
            f"{root}/train and {root}/val have different class folders (e.g. {', '.join(extra)})"
        )
    return train, val


def _cifar(
    data_cfg: DataRecipe, model: nn.Module, in_chans: int
) -> tuple[Dataset[Sample], Dataset[Sample]]:
    cls, root = _cifar_root(data_cfg)
    size = data_cfg.image_size or NATIVE_SIZE[data_cfg.dataset]
    mean, std = _normalization(model, in_chans)
    native = NATIVE_SIZE[data_cfg.dataset]
    try:
        train = cls(
            str(root),
            train=True,
            download=False,
            transform=small_image_transform(
                native, size, in_chans, mean, std, train=data_cfg.augment
            ),
        )
        val = cls(
            str(root),
            train=False,
            download=False,
            transform=small_image_transform(native, size, in_chans, mean, std, train=False),
        )
    except RuntimeError as exc:
        raise _cifar_missing(cls, root) from exc
    return train, val


def _fashion_mnist(
    data_cfg: DataRecipe, model: nn.Module, in_chans: int
) -> tuple[Dataset[Sample], Dataset[Sample]]:
    size = data_cfg.image_size or NATIVE_SIZE["fashion_mnist"]
    mean, std = _normalization(model, in_chans)
    native = NATIVE_SIZE["fashion_mnist"]
    image_mode(in_chans)  # a DataError for channel counts images cannot have

    def split(train: bool) -> ArrayImages:
        augment = train and data_cfg.augment
        if size == native and not augment:  # tensor ops, no PIL (the same values)
            raw = load_fashion_mnist(data_cfg.root, train=train)
            return NormalizedArrayImages(raw.images, raw.labels, raw.classes, in_chans, mean, std)
        transform = small_image_transform(native, size, in_chans, mean, std, train=augment)
        return load_fashion_mnist(data_cfg.root, train=train, transform=transform)

    return split(train=True), split(train=False)


def _synthetic(
    data_cfg: DataRecipe, model: nn.Module, in_chans: int, seed: int
) -> tuple[Dataset[Sample], Dataset[Sample]]:
    classes = model_num_classes(model) or 10
    size = data_cfg.image_size or NATIVE_SIZE["synthetic"]
    n_train = data_cfg.train_samples or SYNTHETIC_DEFAULT_SIZES[0]
    n_val = data_cfg.val_samples or SYNTHETIC_DEFAULT_SIZES[1]
    return (
        SyntheticImages(n_train, classes, in_chans, size, seed=seed, split="train"),
        SyntheticImages(n_val, classes, in_chans, size, seed=seed, split="val"),
    )


def build_datasets(
    data_cfg: DataRecipe, model: nn.Module, *, seed: int = 0
) -> tuple[Dataset[Sample], Dataset[Sample]]:
    """The train and validation datasets of ``data_cfg`` (the recipe's ``data`` section).

    Items are ``(image tensor (C, H, W), class index)``, with C the model's input channels
    (gray images are replicated for RGB models and RGB converted for gray ones) and the
    model's normalisation. ``train_samples`` / ``val_samples`` cap each split to a
    deterministic random subset (seeded by ``seed``); for ``synthetic`` they are its sizes
    (default 1024 / 256) and the model's classifier gives the number of classes.
    Missing data raises `DataError`.
    """
    in_chans = in_channels(model)
    if data_cfg.dataset == "synthetic":
        return _synthetic(data_cfg, model, in_chans, seed)
    builders = {
        "imagefolder": _imagefolder,
        "cifar10": _cifar,
        "cifar100": _cifar,
        "fashion_mnist": _fashion_mnist,
    }
    if data_cfg.dataset not in builders:
        raise DataError(f"unknown dataset {data_cfg.dataset!r}")
    train, val = builders[data_cfg.dataset](data_cfg, model, in_chans)
    train = cap_dataset(train, data_cfg.train_samples, seed=seed)
    val = cap_dataset(val, data_cfg.val_samples, seed=seed + 1)
    _logger.info(
        "%s: %d training and %d validation samples",
        data_cfg.dataset,
        len(train),  # type: ignore[arg-type]
        len(val),  # type: ignore[arg-type]
    )
    return train, val


def check_label_count(dataset: Dataset[Any], num_classes: int) -> None:
    """Raise `DataError` when ``dataset`` names more or fewer classes than the model predicts:
    more cannot train (labels beyond the outputs), fewer would train a head whose other outputs
    never see an example (a 1000-class head on a 3-class folder)."""
    classes = dataset_classes(dataset)
    if classes and len(classes) != num_classes:
        raise DataError(
            f"the dataset has {len(classes)} classes but the model predicts {num_classes}: "
            f"set model.num_classes={len(classes)} (a new classifier of that size, freshly "
            "initialised; the rest of the model keeps its weights)"
        )
