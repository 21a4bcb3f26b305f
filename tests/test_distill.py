"""Label-free distillation after conversion (docs/design.md section 2.10)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mcn_compress import MCNConfig, calibrate, convert, load, load_float_model, save
from mcn_compress.errors import ConfigError
from mcn_compress.info import info_of
from mcn_compress.passes.distill import distill_from_float


def _naive_kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor, t: float = 4.0) -> float:
    """Mean over images of sum_c p_c (log p_c - log q_c), p = softmax(teacher / T), q the
    student's, both in eval mode: written out, independent of the library's loss."""
    student.eval()
    teacher.eval()
    with torch.no_grad():
        p = torch.softmax(teacher(x).double() / t, dim=1)
        q = torch.softmax(student(x).double() / t, dim=1)
    return float((p * (p.log() - q.log())).sum(dim=1).mean())


@pytest.fixture(scope="module")
def float_model() -> nn.Module:
    """A random-init tiny resnet with a sharpened classifier, so its outputs differ by image."""
    torch.manual_seed(0)
    model = load_float_model("mcn_resnet_tiny", pretrained=False, num_classes=10, in_chans=1)
    with torch.no_grad():
        model.get_classifier().weight.mul_(20.0)
    return model.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, 7, 7, generator=gen)
    return nn.functional.interpolate(low, size=(28, 28), mode="bilinear") + 0.3 * torch.randn(
        n, 1, 28, 28, generator=gen
    )


def test_distillation_lowers_kl_on_held_out_images(float_model: nn.Module) -> None:
    train = _images(256, seed=1)
    held_out = _images(256, seed=2)
    batches = [train[i : i + 32] for i in range(0, len(train), 32)]
    before = convert(float_model, MCNConfig(planes=4))
    calibrate(before, float_model, batches)
    after = convert(float_model, MCNConfig(planes=4))
    result = calibrate(after, float_model, batches, steps=60)
    assert result.images == 256 and result.steps == 60
    kl_before = _naive_kl(before, float_model, held_out)
    kl_after = _naive_kl(after, float_model, held_out)
    assert kl_after < 0.6 * kl_before, (kl_before, kl_after)
    summary = info_of(after).summary
    assert summary is not None
    assert (summary.calibration_images, summary.calibration_steps) == (256, 60)
    assert (
        summary.calibration_kl is not None and summary.calibration_kl[1] < summary.calibration_kl[0]
    )
    json.dumps(summary.to_dict())  # JSON-ready
    assert not after.training


def test_float_model_untouched_and_flags_restored(float_model: nn.Module) -> None:
    state = {k: v.clone() for k, v in float_model.state_dict().items()}
    mcn = convert(float_model, MCNConfig(planes=2))
    mcn.train()
    result = distill_from_float(mcn, float_model, iter([_images(16, 3)]), steps=3)
    assert (result.steps, result.images, result.images_seen) == (3, 16, 48)
    assert mcn.training and not float_model.training
    assert all(p.requires_grad for p in mcn.parameters())
    for key, value in float_model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        distill_from_float(mcn, float_model, [_images(4, 3)], steps=0)
    with pytest.raises(ConfigError, match="no calibration batches"):
        distill_from_float(mcn, float_model, [], steps=2)


def test_steps_zero_is_batchnorm_only_and_checkpoint_records_it(
    float_model: nn.Module, tmp_path: object
) -> None:
    batches = [_images(32, 4), _images(32, 5)]
    plain = convert(float_model, MCNConfig(planes=4))
    bn_only = convert(float_model, MCNConfig(planes=4))
    calibrate(bn_only, float_model, batches, steps=0)
    for (name, a), (_, b) in zip(plain.named_parameters(), bn_only.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # weights unchanged, only BN statistics move
    summary = info_of(bn_only).summary
    assert summary is not None
    assert (summary.calibration_images, summary.calibration_steps) == (64, 0)
    # the KL to the float model in eval mode, on the calibration images, before = after
    assert summary.calibration_kl is not None
    naive = _naive_kl(bn_only, float_model, torch.cat(batches), t=1.0)
    assert summary.calibration_kl == pytest.approx((naive, naive), rel=1e-4)
    path = save(bn_only, tmp_path / "m.pt")  # type: ignore[operator]
    conversion = info_of(load(path)).metadata["conversion"]
    assert conversion["calibration_images"] == 64 and conversion["calibration_steps"] == 0
    with pytest.raises(ConfigError, match="no calibration batches"):
        calibrate(plain, float_model, [], steps=5)
    with pytest.raises(ConfigError, match=">= 0"):
        calibrate(plain, float_model, batches, steps=-1)


def test_expand_width_distills(float_model: nn.Module) -> None:
    train = _images(128, seed=6)
    held_out = _images(128, seed=7)
    batches = [train[i : i + 32] for i in range(0, len(train), 32)]
    mcn = convert(float_model, MCNConfig(planes=2, width="expand"))
    calibrate(mcn, float_model, batches)
    kl_before = _naive_kl(mcn, float_model, held_out)
    calibrate(mcn, float_model, batches, steps=30)
    assert _naive_kl(mcn, float_model, held_out) < 0.8 * kl_before
    summary = info_of(mcn).summary
    assert summary is not None and summary.calibration_steps == 30
