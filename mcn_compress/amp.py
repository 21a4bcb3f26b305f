"""Which autocast dtype a device computes natively (docs/design.md section 2.10).

The calibration (`passes.distill`) and the Fashion-MNIST experiments run their forward passes
under bfloat16 autocast where the hardware has bfloat16 arithmetic: a CPU with AVX512-BF16 or
AMX (read from /proc/cpuinfo; a step then takes about half the time), a CUDA device that
reports bfloat16 support. Parameters stay float32; only the autocast region computes in
bfloat16.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mcn_compress.defaults import AMP_MODES
from mcn_compress.errors import ConfigError

CPUINFO = Path("/proc/cpuinfo")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively: an ``avx512_bf16`` or ``amx_bf16`` flag in
    ``cpuinfo`` (default: the text of /proc/cpuinfo; False where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="ascii", errors="replace")
        except OSError:
            return False
    flags = {
        flag
        for line in cpuinfo.splitlines()
        if line.split(":", 1)[0].strip() == "flags"
        for flag in line.split(":", 1)[1].split()
    }
    return any(flag in flags for flag in _BF16_FLAGS)


def device_has_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (`cpu_has_bf16` for a CPU,
    ``torch.cuda.is_bf16_supported`` for CUDA, False for anything else)."""
    if device.type == "cpu":
        return cpu_has_bf16()
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``: ``"bf16"`` always bfloat16, ``"off"``
    None (float32), ``"auto"`` bfloat16 where `device_has_bf16`, else None.

    Raises `ConfigError` for another ``amp``."""
    if amp not in AMP_MODES:
        raise ConfigError(f"amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    if amp == "off" or (amp == "auto" and not device_has_bf16(device)):
        return None
    return torch.bfloat16


__all__ = ["autocast_dtype", "cpu_has_bf16", "device_has_bf16"]
