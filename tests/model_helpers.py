"""Conversion shortcuts for tests that overwrite every parameter afterwards."""

from __future__ import annotations

from torch import nn

from mcn_compress import MCNConfig
from mcn_compress.passes.convert import WIDTH_PASSES


def bare_convert(model: nn.Module, config: MCNConfig) -> nn.Module:
    """``convert(model, config)`` without the least-squares fit of signs and M (fast)."""
    return WIDTH_PASSES[config.width](model, config, initialize=False)
