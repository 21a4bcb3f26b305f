"""Which autocast dtype a device computes natively (`mcn_compress.amp`, design.md 2.10)."""

from __future__ import annotations

import pytest
import torch

import mcn_compress.amp
from mcn_compress.amp import autocast_dtype, cpu_has_bf16
from mcn_compress.errors import ConfigError

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\nbugs\t\t: spectre_v1 avx512_bf16x\n"


@pytest.mark.parametrize(
    ("extra", "native"),
    [("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True), ("avx512f", False), ("", False)],
)
def test_cpu_has_bf16_reads_the_flags_line(extra: str, native: bool) -> None:
    assert cpu_has_bf16(CPUINFO.format(extra=extra)) is native


def test_autocast_dtype_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(mcn_compress.amp, "cpu_has_bf16", lambda cpuinfo=None, n=native: n)
        assert autocast_dtype(cpu, "auto") == (torch.bfloat16 if native else None)
        assert autocast_dtype(cpu, "bf16") == torch.bfloat16
        assert autocast_dtype(cpu, "off") is None
    assert autocast_dtype(torch.device("meta"), "auto") is None
    with pytest.raises(ConfigError, match="auto, bf16, off"):
        autocast_dtype(cpu, "float16")


def test_experiments_cpu_amp_follows_the_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcn_compress.experiments.fashion_mnist import cpu_amp

    monkeypatch.setattr(mcn_compress.amp, "cpu_has_bf16", lambda cpuinfo=None: True)
    assert cpu_amp() == "bf16"
    monkeypatch.setattr(mcn_compress.amp, "cpu_has_bf16", lambda cpuinfo=None: False)
    assert cpu_amp() == "off"
