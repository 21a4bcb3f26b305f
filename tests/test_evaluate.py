"""Tests of `mcn_compress.evaluate`: top-1 / top-5 accuracy against naive loops over single
samples, and the Fashion-MNIST test set against its raw IDX pixels."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from report_helpers import (
    fashion_files,
    naive_accuracy,
    needs_fashion,
    tiny_classifier,
)
from torch import nn
from torch.utils.data import TensorDataset

from mcn_compress.data import SyntheticImages
from mcn_compress.errors import DataError
from mcn_compress.evaluate import accuracy, evaluate_accuracy
from mcn_compress.training.recipe import DataRecipe


def test_accuracy_matches_a_naive_loop_on_synthetic_data() -> None:
    model = tiny_classifier().train()
    cfg = DataRecipe(dataset="synthetic", image_size=16, batch_size=16, workers=0, val_samples=60)
    calls: list[tuple[int, int]] = []
    top1, top5 = evaluate_accuracy(model, cfg, lambda done, total: calls.append((done, total)))
    # build_datasets' synthetic validation split: seed 0, the model's classes and channels
    reference = SyntheticImages(60, 10, 1, 16, seed=0, split="val")
    assert top1 == pytest.approx(naive_accuracy(model, reference, 1))
    assert top5 == pytest.approx(naive_accuracy(model, reference, 5))
    assert 0 < top1 < top5 < 100  # neither trivial
    assert calls == [(0, 60), (16, 60), (32, 60), (48, 60), (60, 60)]
    model.train()
    evaluate_accuracy(model, cfg)
    assert model.training  # mode restored


def test_accuracy_refuses_labels_beyond_the_outputs() -> None:
    data = TensorDataset(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 7, 1]))
    with pytest.raises(DataError, match="label 7 is out of range for a model with 4 outputs"):
        accuracy(tiny_classifier(classes=4), data, batch_size=4)


def test_accuracy_wraps_a_model_that_cannot_take_the_images() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(5, 3))
    data = TensorDataset(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(DataError, match=r"cannot run on images of shape \(1, 8, 8\)"):
        accuracy(model, data)


def read_idx_gz(path: Path) -> np.ndarray:
    """IDX parsed here, independently of `data.read_idx` (uint8 data, big-endian dims)."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@needs_fashion
def test_accuracy_on_the_fashion_mnist_test_set_matches_raw_pixels() -> None:
    """A bias-free linear model whose class rows sum to zero ranks classes the same on raw
    pixels / 255 as on normalised ones (``(x - m) / s`` shifts every logit by the same amount
    times zero and scales by ``1 / s``), so the reference is computed from the raw IDX files."""
    torch.manual_seed(0)
    weights = torch.randn(10, 28 * 28, dtype=torch.float64)
    weights -= weights.mean(dim=1, keepdim=True)
    identity = nn.Conv2d(1, 1, 1, bias=False)  # a conv so the data has the model's 1 channel
    linear = nn.Linear(28 * 28, 10, bias=False)
    with torch.no_grad():
        identity.weight.fill_(1.0)
        linear.weight.copy_(weights)
    model = nn.Sequential(identity, nn.Flatten(), linear)
    cfg = DataRecipe(dataset="fashion_mnist", batch_size=500, workers=0)
    top1, top5 = evaluate_accuracy(model, cfg)

    images = torch.from_numpy(read_idx_gz(fashion_files[0]).reshape(-1, 28 * 28) / 255.0)
    labels = torch.from_numpy(read_idx_gz(fashion_files[1]).astype(np.int64))
    logits = images @ weights.T
    target = logits.gather(1, labels[:, None])
    eps = 1e-6 * float(logits.abs().max())  # float32 model vs float64 reference: near-ties
    above_surely = (logits > target + eps).sum(1)  # strictly larger however rounding goes
    above_maybe = (logits > target - eps).sum(1) - 1  # minus the target itself
    for k, measured in ((1, top1), (5, top5)):
        low = 100 * float((above_maybe < k).sum()) / len(labels)
        high = 100 * float((above_surely < k).sum()) / len(labels)
        assert low <= measured <= high, (k, low, measured, high)
        assert high - low < 0.1


@needs_fashion
def test_fashion_mnist_with_more_classes_than_outputs_is_refused() -> None:
    cfg = DataRecipe(dataset="fashion_mnist", workers=0, val_samples=10)
    with pytest.raises(DataError, match="fashion_mnist has 10 classes but the model predicts 4"):
        evaluate_accuracy(tiny_classifier(classes=4), cfg)
