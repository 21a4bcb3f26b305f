"""Shared test set-up: never touch the network, small deterministic inputs."""

from __future__ import annotations

import logging
import os

# Offline: hub look-ups must fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from report_helpers import NAME, K
from safetensors.torch import save_file
from synthetic_run import synthetic_recipe

from mcn_compress import MCNConfig, convert, export_packed, load_float_model, save
from mcn_compress.training.recipe import recipe_from_dict
from mcn_compress.training.trainer import Trainer

# One thread: the suite shares two cores with the 2-process gloo test and any other load.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _library_logs_reach_caplog() -> Iterator[None]:
    """The CLI routes ``mcn_compress`` logs to its own handler without propagation; undo that
    after each test so that later tests' ``caplog`` sees the library's records."""
    yield
    logger = logging.getLogger("mcn_compress")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A float model with its weights in a local file, its checkpoint and packed file."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("report")
    float_model = load_float_model(NAME, pretrained=False)
    weights = root / "float.safetensors"
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(weights))
    float_model = load_float_model(NAME, weights=weights).eval()
    model = convert(float_model, MCNConfig(planes=K))
    ckpt = save(model, root / "model.pt")
    packed = export_packed(model, root / "model.mcn")
    return {"float": float_model, "ckpt": ckpt, "packed": packed, "root": root}


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory written by a real (short) `Trainer` run."""
    root = tmp_path_factory.mktemp("runs") / "run"
    trainer = Trainer(recipe_from_dict(synthetic_recipe(root)))
    trainer.fit()
    trainer.close()
    return root
