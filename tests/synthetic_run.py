"""A ~5-second synthetic fine-tuning recipe shared by the training and report tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def synthetic_recipe(run_dir: Path, **optim: Any) -> dict[str, Any]:
    """Recipe dict: mcn_resnet_small at K=4 on 128 synthetic 28x28 images, 2 epochs."""
    return {
        "model": {
            "name": "mcn_resnet_small",
            "pretrained": False,
            "num_classes": 4,
            "in_chans": 1,
            "convert": {"planes": 4},
        },
        "data": {
            "dataset": "synthetic",
            "image_size": 28,
            "batch_size": 32,
            "workers": 0,
            "train_samples": 128,
            "val_samples": 64,
        },
        "optim": {"epochs": 2, "lr": 2e-3, "warmup_epochs": 1, **optim},
        "loss": {"theta": 1e-3, "lambda_center": 1e-2, "alpha": 0.5},
        "runtime": {"seed": 3},
        "output": {"dir": str(run_dir)},
    }
