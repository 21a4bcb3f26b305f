"""Label-free distillation after conversion (docs/design.md section 2.10)."""

from __future__ import annotations

import copy
import json
import math

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


class _Reshuffled:
    """Batches of ``images`` in a new random order on every pass; records what each pass read."""

    def __init__(self, images: torch.Tensor, batch: int) -> None:
        self.images, self.batch, self.passes = images, batch, []  # type: list[list[torch.Tensor]]
        self.gen = torch.Generator().manual_seed(3)

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = torch.randperm(len(self.images), generator=self.gen)
        read: list[torch.Tensor] = []
        self.passes.append(read)
        for start in range(0, len(order), self.batch):
            read.append(self.images[order[start : start + self.batch]])
            yield read[-1]


def test_kl_probes_compare_the_same_images_before_and_after(float_model: nn.Module) -> None:
    """Both KL probes read the images of the first probe's pass (the data reshuffles between
    passes); each value is the naive KL at T = 1 on those images."""
    data = _Reshuffled(_images(96, seed=8), batch=16)
    mcn = convert(float_model, MCNConfig(planes=4))
    recalibrated = []
    result = calibrate(
        mcn,
        float_model,
        data,
        steps=4,
        probe_images=40,
        progress=lambda e: recalibrated.append(copy.deepcopy(mcn)) if e.done == 96 else None,
    )
    probe_pass = data.passes[1]  # pass 0: the BatchNorm recalibration
    probed = torch.cat(probe_pass)[:40]
    assert result.kl is not None
    before = _naive_kl(recalibrated[0], float_model, probed, t=1.0)
    after = _naive_kl(mcn, float_model, probed, t=1.0)
    assert result.kl == pytest.approx((before, after), rel=1e-4)
    later = torch.cat(data.passes[-1])[:40]
    assert not torch.equal(later, probed)  # a later pass reads other images first


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


# --- the calibration method of issue 25: KL at T, bfloat16 autocast (design.md 2.10) --------
def test_kl_to_teacher_matches_its_definition() -> None:
    from mcn_compress.passes.distill import kl_to_teacher

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=gen), 3 * torch.randn(5, 7, generator=gen)
    for t in (1.0, 2.0, 4.0):
        p = [[math.exp(v / t) for v in row] for row in teacher.tolist()]
        q = [[math.exp(v / t) for v in row] for row in student.tolist()]
        p = [[v / sum(row) for v in row] for row in p]
        q = [[v / sum(row) for v in row] for row in q]
        naive = sum(
            sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(pr, qr, strict=True))
            for pr, qr in zip(p, q, strict=True)
        ) / len(p)
        assert float(kl_to_teacher(student, teacher, t)) == pytest.approx(t * t * naive, rel=1e-5)


def _autocast_log(model: nn.Module) -> list[tuple[bool, torch.dtype]]:
    """(autocast enabled, its dtype) seen by ``model``'s forward passes."""
    seen: list[tuple[bool, torch.dtype]] = []

    def hook(*_: object) -> None:
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    model.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize(
    ("amp", "native", "autocast"),
    [("auto", True, True), ("auto", False, False), ("bf16", False, True), ("off", True, False)],
)
def test_bf16_autocast_only_when_asked_or_native(
    float_model: nn.Module, monkeypatch: pytest.MonkeyPatch, amp: str, native: bool, autocast: bool
) -> None:
    import copy

    import mcn_compress.amp

    monkeypatch.setattr(mcn_compress.amp, "cpu_has_bf16", lambda cpuinfo=None: native)
    teacher = copy.deepcopy(float_model)
    mcn = convert(teacher, MCNConfig(planes=4))
    student_log, teacher_log = _autocast_log(mcn), _autocast_log(teacher)
    result = distill_from_float(mcn, teacher, [_images(8, 9)], steps=2, amp=amp, recalibrate=False)
    assert result.precision == ("bfloat16" if autocast else "float32")
    want = (True, torch.bfloat16) if autocast else (False,)
    assert [entry[: len(want)] for entry in student_log] == [want, want]
    assert [entry[: len(want)] for entry in teacher_log] == [want]  # once: its logits are kept
    # parameters, their gradients and the optimiser's work stay float32 (autocast only)
    assert all(p.dtype == torch.float32 for p in [*mcn.parameters(), *teacher.parameters()])
    assert all(b.dtype != torch.bfloat16 for b in mcn.buffers())
    # the KL probes and the BatchNorm recalibration of calibrate() run in float32
    student_log.clear()
    calibrate(mcn, teacher, [_images(8, 9)], steps=1, amp=amp)
    assert student_log[0][0] is False and student_log[-1][0] is False
    assert any(entry[0] for entry in student_log) == autocast


def test_bf16_distillation_lowers_kl_and_unknown_amp_is_refused(float_model: nn.Module) -> None:
    train = _images(256, seed=11)
    held_out = _images(256, seed=12)
    batches = [train[i : i + 32] for i in range(0, len(train), 32)]
    mcn = convert(float_model, MCNConfig(planes=4))
    calibrate(mcn, float_model, batches)
    kl_before = _naive_kl(mcn, float_model, held_out, t=1.0)
    result = calibrate(mcn, float_model, batches, steps=60, amp="bf16")
    assert result.precision == "bfloat16"
    assert _naive_kl(mcn, float_model, held_out, t=1.0) < 0.6 * kl_before
    assert result.kl is not None and result.kl[1] < result.kl[0]
    with pytest.raises(ConfigError, match="amp 'fp8'"):
        calibrate(mcn, float_model, batches, steps=1, amp="fp8")


def test_later_passes_reuse_the_kept_images_and_float_logits(float_model: nn.Module) -> None:
    """Within ``cache_bytes`` the float model runs once per image and later passes draw the
    same images in a new order; with ``cache_bytes=0`` every pass reads the batches again."""
    import copy

    batches = [_images(8, 20), _images(8, 21), _images(4, 22)]
    everything = torch.cat(batches)
    for cache, teacher_calls in [(10**9, 3), (0, 9)]:
        teacher = copy.deepcopy(float_model)
        mcn = convert(teacher, MCNConfig(planes=4))
        calls = _autocast_log(teacher)  # after convert, which copies hooks
        inputs: list[torch.Tensor] = []
        mcn.register_forward_pre_hook(lambda _, args, seen=inputs: seen.append(args[0].clone()))
        result = distill_from_float(
            mcn, teacher, batches, steps=9, amp="off", recalibrate=False, cache_bytes=cache
        )
        assert len(calls) == teacher_calls
        assert (result.images, result.images_seen) == (20, 60)
        assert [len(x) for x in inputs] == [8, 8, 4] * 3
        for start in (3, 6):  # each later pass: every image once
            drawn = torch.cat(inputs[start : start + 3])
            assert torch.equal(
                drawn[drawn[:, 0, 0, 0].argsort()], everything[everything[:, 0, 0, 0].argsort()]
            )
        if cache:
            assert not torch.equal(torch.cat(inputs[3:6]), everything)  # reshuffled
