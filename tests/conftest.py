"""Shared test set-up: never touch the network, small deterministic inputs."""

from __future__ import annotations

import os

# Offline: hub look-ups must fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# One thread: the suite shares two cores with the 2-process gloo test and any other load.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
