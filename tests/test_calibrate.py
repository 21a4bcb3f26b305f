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


def test_max_images_stops_after_the_batch_that_reaches_it() -> None:
    """BatchNorm statistics from the first batches only (design.md 2.10, large inputs)."""
    from mcn_compress.defaults import default_batch, default_bn_images, default_probe_images

    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2))
    batches = [torch.randn(4, 2, 3, 3) + i for i in range(5)]
    assert recalibrate_batchnorm(model, batches, max_images=6) == 8
    first = torch.cat(batches[:2])
    assert torch.allclose(model[0].running_mean, first.mean(dim=(0, 2, 3)), atol=1e-5)
    assert default_bn_images((28, 28)) is None and default_bn_images((224, 224)) == 256
    assert (default_probe_images((64, 64)), default_probe_images((224, 224))) == (256, 128)
    assert (default_batch((64, 64)), default_batch((224, 224))) == (32, 16)
