"""`MCConv2d`: the modulated convolution of Wang et al., "Modulated Convolutional Networks",
CVPR 2018 (docs/design.md section 2; Eq. 3.13-3.17 of the MCN chapter).

Parameters: latent filters ``C`` (``weight``, shape ``(out // K, in // groups, kh, kw)``) and the
M-Filter ``M`` (``mfilter``, shape ``(K, kh, kw)``, or ``(K, 1, 1)`` for MCNs-1). Forward:
``B = sign(C)``, ``Q[h*K + j, c] = B[h, c] * M[j]``, ``y = conv2d(x, Q, bias, ...)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from mcn_compress.nn.init import fit_binary_approximation, latent_from_fit
from mcn_compress.nn.sign import hard_sign, ste_sign


class MCConv2d(nn.Module):
    """Modulated 2-D convolution: 1-bit filters modulated by a learned M-Filter.

    Channel ``c = g*K + k`` of a tensor is plane ``k`` of feature map ``g``. One binary filter
    ``B[h]`` yields the K output channels ``h*K + j`` (``j = 0..K-1``) by modulation with each
    plane of M. In eval mode the reconstructed weight Q is computed once and reused until a
    parameter changes (in place, by replacement, by `load_state_dict` or an optimizer step
    after a forward with gradients), ``.eval()``/``.train()`` is called again, or
    `invalidate_cache` is called. Edits through ``param.data`` bypass PyTorch's version counter:
    call ``.eval()`` or `invalidate_cache` after them.

    Example:
        >>> conv = MCConv2d(64, 128, 3, padding=1, planes=4)
        >>> conv(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 128, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        planes: int = 4,
        mcn1: bool = False,
        clip: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if planes < 1:
            raise ValueError(f"planes must be >= 1, got {planes}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"channels ({in_channels}, {out_channels}) not divisible by groups {groups}"
            )
        if (in_channels // groups) % planes or (out_channels // groups) % planes:
            raise ValueError(
                f"per-group channels ({in_channels // groups} in, {out_channels // groups} out) "
                f"must be divisible by planes {planes}"
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.planes = planes
        self.mcn1 = mcn1
        self.clip = clip
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(
            torch.empty(out_channels // planes, in_channels // groups, kh, kw, **factory)
        )
        mshape = (planes, 1, 1) if mcn1 else (planes, kh, kw)
        self.mfilter = nn.Parameter(torch.empty(mshape, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._cached_q: torch.Tensor | None = None
        self._cache_key: tuple[Any, ...] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform C (as `nn.Conv2d`), M at the filter-loss minimiser for sign(C)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        with torch.no_grad():
            self.mfilter.copy_(self.filter_loss_minimizer())
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    # --- maths -----------------------------------------------------------------------------
    def reconstruct(self) -> torch.Tensor:
        """``Q[h*K + j, c] = sign(C[h, c]) * M[j]``, shape ``(out, in // groups, kh, kw)``."""
        signs = ste_sign(self.weight, self.clip)
        q = signs.unsqueeze(1) * self.mfilter.unsqueeze(0).unsqueeze(2)
        return q.reshape(self.out_channels, *self.weight.shape[1:])

    def _mfilter_per_input_channel(self) -> torch.Tensor:
        """``M[c mod K]`` for every input channel c: shape ``(in // groups, kh|1, kw|1)``."""
        return self.mfilter.repeat(self.weight.shape[1] // self.planes, 1, 1)

    def filter_loss(self) -> torch.Tensor:
        """``1/2 * sum_{h,c} ||C[h, c] - B[h, c] * M[c mod K]||^2`` with B constant (Eq. 3.18)."""
        signs = hard_sign(self.weight.detach())
        residual = self.weight - signs * self._mfilter_per_input_channel()
        return 0.5 * residual.pow(2).sum()

    def filter_loss_minimizer(self) -> torch.Tensor:
        """Closed-form minimiser of `filter_loss` in M: ``M[k] = mean_{h,g} |C[h, g*K + k]|``."""
        h, cin, kh, kw = self.weight.shape
        grouped = self.weight.detach().abs().reshape(h, cin // self.planes, self.planes, kh, kw)
        dims = (0, 1, 3, 4) if self.mcn1 else (0, 1)
        return grouped.mean(dim=dims).reshape(self.mfilter.shape)

    # --- forward ---------------------------------------------------------------------------
    def _eval_weight(self) -> torch.Tensor:
        needs_graph = torch.is_grad_enabled() and (
            self.weight.requires_grad or self.mfilter.requires_grad
        )
        if needs_graph:
            # A forward with gradients may precede an optimizer step that does not bump
            # `_version` (fused optimizers): drop the cache so the next no-grad call rebuilds.
            self.invalidate_cache()
            return self.reconstruct()
        key = (
            self.weight._version,
            self.mfilter._version,
            self.weight.data_ptr(),
            self.mfilter.data_ptr(),
            self.weight.dtype,
            self.weight.device,
        )
        if self._cached_q is None or self._cache_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._cached_q = self.reconstruct()
            self._cache_key = key
        return self._cached_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile Q is rebuilt inside the graph: the eval cache's version and
        # data-pointer checks would break the graph and recompile after every optimizer step.
        rebuild = self.training or torch.compiler.is_compiling()
        weight = self.reconstruct() if rebuild else self._eval_weight()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def invalidate_cache(self) -> None:
        """Drop the eval-mode Q; needed only after editing parameters through ``.data``."""
        self._cached_q = None
        self._cache_key = None

    def train(self, mode: bool = True) -> MCConv2d:
        """Switch mode; the eval-mode cache of Q is dropped either way."""
        self.invalidate_cache()
        return super().train(mode)

    # --- conversions -----------------------------------------------------------------------
    @classmethod
    def like_conv2d(
        cls,
        conv: nn.Conv2d,
        planes: int = 4,
        mcn1: bool = False,
        clip: float = 1.0,
        widen: int = 1,
    ) -> MCConv2d:
        """A freshly initialised MCConv2d with ``conv``'s geometry, device and dtype; channel
        counts multiplied by ``widen`` (``width: expand`` uses ``widen = K``)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")
        return cls(
            conv.in_channels * widen,
            conv.out_channels * widen,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            planes=planes,
            mcn1=mcn1,
            clip=clip,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        planes: int = 4,
        mcn1: bool = False,
        clip: float = 1.0,
        init_iters: int = 10,
    ) -> MCConv2d:
        """Build an MCConv2d approximating ``conv``'s weight by least squares (docs/design.md
        section 2).

        Signs and M are fitted by alternating closed-form steps; the latent C has those signs
        and the filter-loss minimiser ``|M|``. The bias is copied.
        """
        w0 = conv.weight.detach()
        mod = cls.like_conv2d(conv, planes=planes, mcn1=mcn1, clip=clip)
        signs, mfilter = fit_binary_approximation(w0, planes, mcn1=mcn1, iters=init_iters)
        with torch.no_grad():
            mod.weight.copy_(latent_from_fit(w0, signs, mfilter, mcn1=mcn1))
            mod.mfilter.copy_(mfilter)
            if conv.bias is not None and mod.bias is not None:
                mod.bias.copy_(conv.bias.detach())
        mod.weight.requires_grad_(conv.weight.requires_grad)
        return mod

    def to_conv2d(self) -> nn.Conv2d:
        """An ordinary `nn.Conv2d` whose weight is the reconstructed Q (folded, float)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.reconstruct())
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, planes={self.planes}"
        )
        if self.padding not in ((0, 0), "valid"):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.mcn1:
            text += ", mcn1=True"
        return text
