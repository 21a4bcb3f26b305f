"""`ste_sign`: binarization with a clipped straight-through estimator.

Forward: ``sign(x)`` with ``sign(0) = +1`` (docs/design.md section 2, Eq. 3.13 of the MCN chapter).
Backward: the incoming gradient passes unchanged where ``|x| <= clip`` and is zero elsewhere
(the straight-through estimator of Hubara et al. 2016, as used by Wang et al., CVPR 2018).
"""

from __future__ import annotations

from typing import Any

import torch


def hard_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with ``sign(0) = +1``, no gradient (values in {-1, +1}, dtype of ``x``)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _STESign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return hard_sign(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad_output * (x.abs() <= ctx.clip).to(grad_output.dtype), None


def ste_sign(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Binarize ``x`` to {-1, +1}; gradient ``1{|x| <= clip}`` (straight-through estimator)."""
    return _STESign.apply(x, clip)
