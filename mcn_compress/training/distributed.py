"""Devices and the torchrun process group."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcn_compress.errors import ConfigError
from mcn_compress.training.recipe import RuntimeRecipe


@dataclass
class DistInfo:
    """Rank layout of this process (world size 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_kind: str) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world,
    )
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a `ConfigError`."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("runtime.device is cuda but no CUDA device is visible; use auto or cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for ``runtime.amp`` (``off``, ``bf16``, ``fp16``) on ``device``."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The CPU (and CUDA) random state, saved with a mid-epoch checkpoint."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def wrap_ddp(model: nn.Module, dist_info: DistInfo, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under torchrun, else ``model`` itself."""
    if not dist_info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def any_rank(flag: bool, device: torch.device, all_ranks: bool) -> bool:
    """Whether ``flag`` is set on this process or, with ``all_ranks``, on any rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if all_ranks:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def to_device(
    images: torch.Tensor, targets: torch.Tensor, device: torch.device, runtime: RuntimeRecipe
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device`` (images channels-last when ``runtime.channels_last``)."""
    images = images.to(device, non_blocking=True)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)
