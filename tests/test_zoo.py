"""Model zoo: conversion, the layer policy, and checkpoint round trips on real architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mcn_compress import MCNConfig, convert, info_of, load, load_float_model, save
from mcn_compress.nn.mcconv import MCConv2d

# model name -> its stem conv (the first conv the input meets)
ZOO = {
    "resnet18": "conv1",
    "resnet50": "conv1",
    "resnet10t": "conv1.0",
    "efficientnet_b0": "conv_stem",
    "mobilenetv3_large_100": "conv_stem",
    "regnety_002": "stem.conv",
    "convnext_atto": "stem.0",
    "densenet121": "features.conv0",
    "vgg11": "features.0",
    "tv:resnet18": "conv1",
    "tv:mobilenet_v2": "features.0.0",
}


def _expected_converted(model: nn.Module, stem: str, k: int) -> set[str]:
    """docs/design.md section 2 policy, written independently: plain Conv2d, groups 1, divisible."""
    return {
        name
        for name, m in model.named_modules()
        if type(m) is nn.Conv2d
        and m.groups == 1
        and m.in_channels % k == 0
        and m.out_channels % k == 0
        and name != stem
    }


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg11" else n for n in ZOO]
)
def test_zoo_convert_and_round_trip(name: str, tmp_path: Path) -> None:
    model = load_float_model(name, pretrained=False).eval()
    # every classifier in this zoo is a Linear layer, so only the stem is excluded here
    expected = _expected_converted(model, ZOO[name], 4)
    assert expected, "the zoo model should have convertible convs"
    mcn = convert(model, MCNConfig(planes=4)).eval()
    got = {n for n, m in mcn.named_modules() if isinstance(m, MCConv2d)}
    assert got == expected
    assert info_of(mcn).summary.traced
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = mcn(x)
        assert y.shape == model(x).shape
        path = save(mcn, tmp_path / "model.pt")
        reloaded = load(path)
        assert torch.equal(reloaded(x), y)
    assert not reloaded.training
