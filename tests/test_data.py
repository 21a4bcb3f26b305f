"""Tests of the fine-tuning datasets: the IDX parser against hand-written headers, the
Fashion-MNIST layouts, synthetic determinism, subset caps and missing-data messages.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from mcn_compress.data import (
    SyntheticImages,
    build_datasets,
    dataset_classes,
    default_num_classes,
)
from mcn_compress.errors import DataError
from mcn_compress.fashion_mnist import DEBIAN_FASHION_MNIST
from mcn_compress.idx import read_idx
from mcn_compress.training.recipe import DataRecipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def rgb_model() -> nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


@pytest.fixture(scope="module")
def gray_model() -> nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)


# --- IDX ------------------------------------------------------------------------------------
def test_read_idx_uint8_from_hand_written_header(tmp_path: Path) -> None:
    # magic 00 00 | type 08 (ubyte) | 3 dims; dims 2, 3, 4 as big-endian uint32
    header = bytes([0, 0, 0x08, 3]) + bytes([0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])
    payload = bytes(range(24))
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(header + payload)
    tensor = read_idx(path)
    assert tensor.dtype == torch.uint8 and tensor.shape == (2, 3, 4)
    assert tensor[1, 2, 3].item() == 23 and tensor[0, 1, 0].item() == 4


def test_read_idx_big_endian_int16_gzipped(tmp_path: Path) -> None:
    header = bytes([0, 0, 0x0B, 1, 0, 0, 0, 3])
    payload = bytes([0x01, 0x02, 0xFF, 0xFE, 0x00, 0x07])  # 258, -2, 7 big-endian
    path = tmp_path / "v-idx1-short.gz"
    path.write_bytes(gzip.compress(header + payload))
    tensor = read_idx(path)
    assert tensor.dtype == torch.int16
    assert tensor.tolist() == [258, -2, 7]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"\x1f\x00\x08\x01\x00\x00\x00\x01\x00", "not an IDX file"),
        (bytes([0, 0, 0x08, 2, 0, 0, 0, 2]), "truncated"),
        (bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]), "needs 5"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, raw: bytes, needle: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=needle):
        read_idx(path)


def write_idx(path: Path, data: torch.Tensor) -> None:
    """Encode a uint8 tensor as IDX (independent of the parser under test)."""
    header = bytes([0, 0, 0x08, data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape)
    path.write_bytes(header + data.numpy().tobytes())


def fake_fashion_torchvision(root: Path, n_train: int = 40, n_val: int = 12) -> dict:
    """A tiny Fashion-MNIST in torchvision's layout (root/FashionMNIST/raw, not gzipped)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        data[prefix] = (images, labels)
    return data


def test_fashion_mnist_torchvision_layout_and_normalisation(
    tmp_path: Path, gray_model: nn.Module
) -> None:
    fake = fake_fashion_torchvision(tmp_path)
    train, val = build_datasets(DataRecipe(dataset="fashion_mnist", root=str(tmp_path)), gray_model)
    assert (len(train), len(val)) == (40, 12)
    image, label = val[5]
    images, labels = fake["t10k"]
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3  # gray: channel average
    expected = (images[5].float() / 255 - mean) / std
    assert image.shape == (1, 28, 28) and label == int(labels[5])
    torch.testing.assert_close(image[0], expected, atol=1e-5, rtol=0)
    assert dataset_classes(train)[0] == "T-shirt/top"


def test_gray_data_is_replicated_for_rgb_models_and_resized(
    tmp_path: Path, rgb_model: nn.Module
) -> None:
    fake_fashion_torchvision(tmp_path)
    cfg = DataRecipe(dataset="fashion_mnist", root=str(tmp_path), image_size=32)
    train, val = build_datasets(cfg, rgb_model)
    image, _ = val[0]
    assert image.shape == (3, 32, 32)
    # the same gray value on every channel, normalised per channel
    gray = [image[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] for c in range(3)]
    torch.testing.assert_close(gray[0], gray[1], atol=1e-5, rtol=0)
    assert train[0][0].shape == (3, 32, 32)


def test_augment_false_trains_on_the_plain_normalised_images(
    tmp_path: Path, gray_model: nn.Module
) -> None:
    fake = fake_fashion_torchvision(tmp_path)
    cfg = DataRecipe(dataset="fashion_mnist", root=str(tmp_path), augment=False)
    train, _ = build_datasets(cfg, gray_model)
    images, _ = fake["train"]
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    for i in range(5):
        expected = (images[i].float() / 255 - mean) / std
        torch.testing.assert_close(train[i][0][0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_name", ["gray_model", "rgb_model"])
def test_native_size_batches_match_the_naive_normalisation(
    tmp_path: Path, model_name: str, request: pytest.FixtureRequest
) -> None:
    """A loader's batches (read with ``__getitems__`` through a capped subset) hold
    ``(x / 255 - mean) / std`` of the stored pixels, the gray value on every channel."""
    model = request.getfixturevalue(model_name)
    fake = fake_fashion_torchvision(tmp_path)
    cfg = DataRecipe(dataset="fashion_mnist", root=str(tmp_path), augment=False, val_samples=7)
    train, val = build_datasets(cfg, model)
    channels = 1 if model_name == "gray_model" else 3
    if channels == 1:
        means, stds = [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]
    else:
        means, stds = list(IMAGENET_MEAN), list(IMAGENET_STD)
    for dataset, (images, labels) in ((train, fake["train"]), (val, fake["t10k"])):
        order = getattr(dataset, "indices", list(range(len(dataset))))
        batch, targets = next(iter(torch.utils.data.DataLoader(dataset, batch_size=5)))
        assert batch.shape == (5, channels, 28, 28)
        for row, index in enumerate(order[:5]):
            assert int(targets[row]) == int(labels[index])
            for c in range(channels):
                expected = (images[index].float() / 255 - means[c]) / stds[c]
                torch.testing.assert_close(batch[row, c], expected, atol=1e-5, rtol=0)


def test_augment_true_crops_and_flips_training_images(
    tmp_path: Path, gray_model: nn.Module
) -> None:
    fake = fake_fashion_torchvision(tmp_path)
    train, _ = build_datasets(DataRecipe(dataset="fashion_mnist", root=str(tmp_path)), gray_model)
    images, _ = fake["train"]
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    plain = (images[0].float() / 255 - mean) / std
    torch.manual_seed(0)
    draws = [train[0][0][0] for _ in range(20)]
    assert not all(torch.allclose(d, plain, atol=1e-5) for d in draws)
    assert all(d.shape == (28, 28) for d in draws)


def test_imagefolder_augment_false_uses_the_eval_transform(
    tmp_path: Path, rgb_model: nn.Module
) -> None:
    make_image_tree(tmp_path)
    cfg = DataRecipe(dataset="imagefolder", root=str(tmp_path), image_size=48, augment=False)
    train, val = build_datasets(cfg, rgb_model)
    # val/cat/0.png and train/cat/0.png hold the same flat colour: same transform, same tensor
    torch.testing.assert_close(train[0][0], val[0][0])
    torch.testing.assert_close(train[0][0], train[0][0])


needs_debian = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{DEBIAN_FASHION_MNIST} absent: apt-get install -y dataset-fashion-mnist",
)


@needs_debian
def test_debian_fashion_mnist_folder(gray_model: nn.Module) -> None:
    labels = read_idx(DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,)
    assert torch.bincount(labels.long()).tolist() == [6000] * 10  # balanced, as published
    cfg = DataRecipe(dataset="fashion_mnist", train_samples=64, val_samples=32)
    train, val = build_datasets(cfg, gray_model)
    assert (len(train), len(val)) == (64, 32)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10
    assert len(dataset_classes(val)) == 10
    test_labels = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert torch.bincount(test_labels.long()).tolist() == [1000] * 10


# --- caps -------------------------------------------------------------------------------------
def test_caps_are_deterministic_random_subsets(tmp_path: Path, gray_model: nn.Module) -> None:
    fake = fake_fashion_torchvision(tmp_path, n_train=40)
    cfg = DataRecipe(dataset="fashion_mnist", root=str(tmp_path), train_samples=10, val_samples=5)
    train_a, val_a = build_datasets(cfg, gray_model, seed=3)
    train_b, _ = build_datasets(cfg, gray_model, seed=3)
    train_c, _ = build_datasets(cfg, gray_model, seed=4)
    assert (len(train_a), len(val_a)) == (10, 5)
    idx = list(train_a.indices)
    assert idx == list(train_b.indices) and idx != list(train_c.indices)
    assert idx == sorted(set(idx)) and max(idx) >= 10  # not simply the first ten
    _, labels = fake["train"]
    assert [train_a[i][1] for i in range(10)] == [int(labels[j]) for j in idx]
    assert dataset_classes(train_a) == dataset_classes(val_a)


# --- synthetic ----------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_seeded(rgb_model: nn.Module) -> None:
    cfg = DataRecipe(dataset="synthetic", train_samples=20, val_samples=8, image_size=16)
    train_a, val_a = build_datasets(cfg, rgb_model, seed=7)
    train_b, _ = build_datasets(cfg, rgb_model, seed=7)
    train_c, _ = build_datasets(cfg, rgb_model, seed=8)
    assert (len(train_a), len(val_a)) == (20, 8)
    x5, y5 = train_a[5]
    _ = [train_b[i] for i in (19, 3, 0)]  # access order must not matter
    assert torch.equal(x5, train_b[5][0]) and y5 == train_b[5][1]
    assert not torch.equal(x5, train_c[5][0])
    assert not torch.equal(x5, val_a[5][0])
    assert x5.shape == (3, 16, 16) and len(dataset_classes(train_a)) == 10
    with pytest.raises(IndexError):
        train_a[20]


def test_synthetic_signal_is_learnable() -> None:
    """Nearest class mean (fit on train) classifies val far above chance."""
    train = SyntheticImages(600, num_classes=6, in_chans=3, image_size=16, seed=0, split="train")
    val = SyntheticImages(120, num_classes=6, in_chans=3, image_size=16, seed=0, split="val")
    xs, ys = zip(*(train[i] for i in range(len(train))), strict=True)
    x, y = torch.stack(xs).flatten(1), torch.tensor(ys)
    means = torch.stack([x[y == k].mean(0) for k in range(6)])
    vx, vy = zip(*(val[i] for i in range(len(val))), strict=True)
    pred = torch.cdist(torch.stack(vx).flatten(1), means).argmin(1)
    assert (pred == torch.tensor(vy)).float().mean() > 0.9
    assert torch.bincount(y, minlength=6).min() > 60  # every class present


# --- image folders and calibration ---------------------------------------------------------------
def make_image_tree(root: Path) -> None:
    from PIL import Image

    for split, count in (("train", 2), ("val", 1)):
        for k, cls in enumerate(("cat", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                colour = (40 + 100 * k, 10 * i, 200)
                Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")


def test_imagefolder_uses_timm_transforms(tmp_path: Path, rgb_model: nn.Module) -> None:
    make_image_tree(tmp_path)
    cfg = DataRecipe(dataset="imagefolder", root=str(tmp_path), image_size=48)
    train, val = build_datasets(cfg, rgb_model)
    assert (len(train), len(val)) == (4, 2)
    assert dataset_classes(train) == ["cat", "dog"]
    image, label = val[1]
    assert image.shape == (3, 48, 48) and label == 1
    # a flat colour survives centre crop + resize: check the normalised red channel
    expected_red = (140 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert image[0, 24, 24].item() == pytest.approx(expected_red, abs=1e-2)
    assert train[0][0].shape == (3, 48, 48)
    assert default_num_classes(cfg) == 2


# --- missing data ---------------------------------------------------------------------------------
def test_missing_fashion_mnist_says_where_and_how(tmp_path: Path, gray_model: nn.Module) -> None:
    with pytest.raises(DataError) as info:
        build_datasets(DataRecipe(dataset="fashion_mnist", root=str(tmp_path)), gray_model)
    message = str(info.value)
    assert str(tmp_path) in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert "apt-get install -y dataset-fashion-mnist" in message


def test_missing_cifar_says_where_and_how(tmp_path: Path, rgb_model: nn.Module) -> None:
    with pytest.raises(DataError) as info:
        build_datasets(DataRecipe(dataset="cifar100", root=str(tmp_path)), rgb_model)
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "cifar-100-python.tar.gz" in message


def test_missing_imagefolder_split_is_named(tmp_path: Path, rgb_model: nn.Module) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        build_datasets(DataRecipe(dataset="imagefolder", root=str(tmp_path)), rgb_model)
    assert f"{tmp_path / 'val'} missing" in str(info.value)


def test_default_num_classes_of_known_datasets() -> None:
    assert default_num_classes(DataRecipe(dataset="cifar100", root="x")) == 100
    assert default_num_classes(DataRecipe(dataset="fashion_mnist")) == 10
    assert default_num_classes(DataRecipe(dataset="synthetic")) is None
