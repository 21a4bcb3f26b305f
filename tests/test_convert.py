"""The conversion pass: layer policy, no mutation, API kept, FX fallback, reported errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mcn_compress import ConfigError, ConversionError, MCNConfig, convert, info_of
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.convert import rebuild


class Toy(nn.Module):
    """Stem, a convertible conv, grouped, depthwise, non-divisible, unused and a conv head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.odd = nn.Conv2d(16, 6, 1)
        self.b = nn.Conv2d(6, 8, 1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.dw(self.g(self.a(x)))
        x = self.b(self.odd(x))
        return self.head(x).mean(dim=(2, 3))


class Untraceable(Toy):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 1.0
        return super().forward(x)


def _kinds(model: nn.Module) -> dict[str, str]:
    return {
        n: ("mcn" if isinstance(m, MCConv2d) else "float")
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | MCConv2d)
    }


def test_policy_k4() -> None:
    mcn = convert(Toy(), MCNConfig(planes=4))
    assert _kinds(mcn) == {
        "stem": "float",
        "a": "mcn",
        "g": "float",
        "dw": "float",
        "odd": "float",
        "b": "float",
        "unused": "float",
        "head": "float",
    }
    reasons = {layer.name: layer.reason for layer in info_of(mcn).summary.layers}
    assert "stem" in reasons["stem"]
    assert reasons["head"] == "classifier"
    assert "grouped" in reasons["g"]
    assert "depthwise" in reasons["dw"]
    assert "divisible" in reasons["odd"] and "divisible" in reasons["b"]
    assert "not called" in reasons["unused"]
    assert reasons["a"] == ""


def test_policy_k2_and_grouped() -> None:
    mcn = convert(Toy(), MCNConfig(planes=2, grouped=True))
    kinds = _kinds(mcn)
    assert kinds["odd"] == kinds["b"] == kinds["g"] == kinds["a"] == "mcn"
    assert kinds["dw"] == kinds["stem"] == kinds["head"] == "float"
    assert mcn.g.groups == 2


def test_include_exclude_patterns() -> None:
    only = convert(Toy(), MCNConfig(planes=2, include=(r"^odd$",)))
    assert [n for n, k in _kinds(only).items() if k == "mcn"] == ["odd"]
    kept = convert(Toy(), MCNConfig(planes=2, exclude=(r"^(a|odd)$",)))
    assert _kinds(kept)["a"] == "float" and _kinds(kept)["b"] == "mcn"
    assert "--keep" in next(x.reason for x in info_of(kept).summary.layers if x.name == "a")


def test_nothing_convertible_raises() -> None:
    with pytest.raises(ConversionError, match="nothing to convert"):
        convert(Toy(), MCNConfig(include=("no-such-layer",)))


def test_bad_config_raises() -> None:
    for kwargs in ({"planes": 0}, {"planes": -2}, {"width": "wide"}, {"exclude": ("(",)}):
        with pytest.raises(ConfigError):
            MCNConfig(**kwargs)
    assert MCNConfig(width="expand").width == "expand"


def test_input_not_mutated_and_output_shape() -> None:
    model = Toy().eval()
    before = copy.deepcopy(model.state_dict())
    types_before = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 12, 12)
    y0 = model(x)
    mcn = convert(model, MCNConfig(planes=2)).eval()
    assert [type(m) for m in model.modules()] == types_before
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(model(x), y0)
    assert mcn(x).shape == y0.shape


def test_reported_error_matches_independent_formula() -> None:
    model = Toy()
    mcn = convert(model, MCNConfig(planes=2))
    for layer in info_of(mcn).summary.converted:
        w0 = model.get_submodule(layer.name).weight.detach()
        mc = mcn.get_submodule(layer.name)
        k = mc.planes
        signs = torch.where(mc.weight.detach() >= 0, 1.0, -1.0)
        m = mc.mfilter.detach()
        q = torch.empty_like(w0)
        for h in range(signs.shape[0]):
            for j in range(k):
                q[h * k + j] = signs[h] * m[j]
        expected = float(torch.linalg.vector_norm(w0 - q) / torch.linalg.vector_norm(w0))
        assert layer.rel_error == pytest.approx(expected, rel=1e-5)


def test_fx_failure_falls_back_to_module_swap() -> None:
    mcn = convert(Untraceable(), MCNConfig(planes=4))
    summary = info_of(mcn).summary
    assert not summary.traced and summary.trace_error
    assert isinstance(mcn.a, MCConv2d) and isinstance(mcn.stem, nn.Conv2d)
    assert mcn(torch.randn(1, 3, 8, 8)).shape == (1, 10)


def test_explicit_layer_list() -> None:
    mcn = rebuild(Toy(), MCNConfig(planes=2), ["odd"])
    assert [n for n, k in _kinds(mcn).items() if k == "mcn"] == ["odd"]
    with pytest.raises(ConversionError, match="no Conv2d named"):
        rebuild(Toy(), MCNConfig(planes=2), ["bn"])


def test_timm_api_is_kept() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    mcn = convert(model)
    assert isinstance(mcn, type(model))
    assert mcn.get_classifier() is mcn.fc and isinstance(mcn.fc, nn.Linear)
    assert mcn.pretrained_cfg == model.pretrained_cfg
    x = torch.randn(1, 3, 32, 32)
    features = mcn.eval().forward_features(x)
    assert mcn.forward_head(features).shape == (1, 7)


def test_training_flag_and_dtype_follow_original() -> None:
    model = Toy().double().train()
    mcn = convert(model, MCNConfig(planes=2))
    assert mcn.a.training and mcn.a.weight.dtype == torch.float64
    model.eval()
    assert not convert(model, MCNConfig(planes=2)).a.training
