"""BatchNorm recalibration after conversion (issue: "BN statistics become wrong").

Binarizing every conv shifts every activation distribution, so the running statistics a
float model learned no longer describe its MCN. This re-estimates them on a few hundred
unlabeled images without changing any weight: each BatchNorm's running mean and variance are
reset and replaced by the cumulative average of the batch statistics (``momentum=None``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_logger = logging.getLogger(__name__)


def batch_input(batch: object) -> torch.Tensor:
    """The input tensor of a batch: the tensor itself or the first item of a pair."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        f"calibration batches must be tensors or (inputs, ...) pairs, got {type(batch)}"
    )


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[object],
    max_batches: int | None = None,
    progress: Callable[[int], None] | None = None,
    max_images: int | None = None,
) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` on ``batches`` (the first
    ``max_batches`` of them, stopping once ``max_images`` images were seen).

    Weights, biases and the model's train/eval flags are unchanged; only BN buffers move.
    Returns the number of images seen (0 when the model has no BatchNorm).
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        _logger.warning("model has no BatchNorm with running statistics; nothing to recalibrate")
        return 0
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    seen = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if max_images is not None and seen >= max_images:
                break
            x = batch_input(batch).to(device)
            model(x)
            seen += x.shape[0]
            if progress is not None:
                progress(x.shape[0])
    finally:
        for module, flag in flags.items():
            module.train(flag)
        for norm, momentum in momenta.items():
            norm.momentum = momentum
    if seen == 0:
        raise ValueError("no calibration batches were given")
    _logger.info("recalibrated %d BatchNorm layers on %d images", len(norms), seen)
    return seen
