"""BatchNorm recalibration: statistics from the data, weights untouched, flags restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcn_compress.passes.calibrate import recalibrate_batchnorm


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5))


def test_running_stats_equal_data_statistics() -> None:
    net = _net().eval()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k}
    batches = [torch.randn(4, 3, 6, 6) * 3 + 1 for _ in range(3)]
    seen = recalibrate_batchnorm(net, batches)
    assert seen == 12
    # Independent reference: per-batch statistics of the conv output, averaged over batches.
    with torch.no_grad():
        outs = [net[0](b) for b in batches]
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-5)
    for key, value in weights.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(net.state_dict()[key], value), key
    assert not net.training and not net[1].training
    assert net[1].momentum == 0.1


def test_pairs_max_batches_and_errors() -> None:
    net = _net().train()
    pairs = [(torch.randn(2, 3, 5, 5), torch.zeros(2)) for _ in range(5)]
    assert recalibrate_batchnorm(net, pairs, max_batches=2) == 4
    assert net.training and net[1].training
    with pytest.raises(ValueError, match="no calibration batches"):
        recalibrate_batchnorm(net, [])
    assert recalibrate_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1)), pairs) == 0
