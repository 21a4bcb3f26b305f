"""Shared pieces of the report tests: the model under test, naive references, data checks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from typer.testing import CliRunner

from mcn_compress.cli import app
from mcn_compress.fashion_mnist import DEBIAN_FASHION_MNIST

K = 4
SLACK = 16 * 1024
NAME = "test_resnet"


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def naive_accuracy(model: nn.Module, dataset: Dataset[Any], k: int) -> float:
    """Percent of samples whose target logit has fewer than ``k`` strictly larger logits,
    one sample at a time."""
    hits = 0
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):  # type: ignore[arg-type]
            image, label = dataset[i]
            logits = model(image[None])[0].tolist()
            hits += sum(v > logits[label] for v in logits) < k
    return 100 * hits / len(dataset)  # type: ignore[arg-type]


def tiny_classifier(classes: int = 10, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


def expected_counts(float_model: nn.Module, layers: list[str]) -> dict[str, int]:
    """Counts of the MCN model derived from the float model and the converted layer names."""
    modules = dict(float_model.named_modules())
    convs = [modules[name] for name in layers]
    params = sum(p.numel() for p in float_model.parameters())
    buffers = sum(b.numel() for b in float_model.buffers() if b.is_floating_point())
    weights = sum(c.weight.numel() for c in convs)
    mfilters = sum(K * c.kernel_size[0] * c.kernel_size[1] for c in convs)
    weight_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in float_model.modules())
    int_bytes = sum(
        b.numel() * b.element_size() for b in float_model.buffers() if not b.is_floating_point()
    )
    float_params = params - weights + mfilters
    return {
        "binary_params": weights // K,
        "float_params": float_params,
        "float_buffers": buffers,
        "converted_layers": len(convs),
        "float_layers": weight_layers - len(convs),
        "min_bytes": math.ceil(weights // K / 8) + 4 * (float_params + buffers) + int_bytes,
        "float32_min": 4 * (params + buffers) + int_bytes,
    }


def layers_of(ckpt: Path) -> list[str]:
    return list(torch.load(ckpt, weights_only=True)["layers"])


fashion_files = [
    DEBIAN_FASHION_MNIST / f"t10k-{n}-idx{d}-ubyte.gz" for n, d in (("images", 3), ("labels", 1))
]


needs_fashion = pytest.mark.skipif(
    not all(f.is_file() for f in fashion_files),
    reason=f"Fashion-MNIST absent from {DEBIAN_FASHION_MNIST}: "
    "apt-get install -y dataset-fashion-mnist",
)


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["report", *args], env={"COLUMNS": "250"})
