"""Eager PyTorch modules of the factored forms (docs/design.md section 4.8), one class per form.

With binary filters ``B = sign(C)`` of shape ``(H, in // groups, kh, kw)``, ``H = out / K``, and
the M-Filter ``M`` of shape ``(K, kh, kw)`` (section 2.3), the dense output

    y[h*K + j](o) = sum_{c, p} B[h, c, p] * M[j, p] * x[c, o*s + p*d]

splits into ``z[h, p](o) = sum_c B[h, c, p] * x[c, o*s + p*d]`` (H binary filters per kernel
position p) and ``y[h*K + j](o) = sum_p A[h, j, p] * z[h, p](o) + bias`` with
``A[h, j, p] = s[h*K + j] * M[j, p]``, where ``s`` (and the shift folded into the bias) come from
a following eval BatchNorm, else 1 (and 0).

`create_factored(layer, plan, scale, shift)` builds the module of ``plan.form``
(`passes.planner.Form`); every form reads its padding and output size from the plan's
`Geometry`. Eval only: gradients are not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcn_compress.errors import ConfigError
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.nn.sign import hard_sign
from mcn_compress.passes.planner import Form, Geometry, LayerPlan, conv_output_hw


class FactoredConv2d(nn.Module):
    """Base of the eval-only forms of one MCConv2d (+ folded BatchNorm).

    Buffers: ``binary`` (the ±1 filters in the layout the form reads, or ``Q * s`` for
    `DenseForm`), ``combine`` (``A``, shape ``(H, K, P)`` or ``(H, K, 1)``), ``bias`` (out,) or
    None.
    """

    form: Form

    def __init__(
        self,
        layer: MCConv2d,
        geometry: Geometry,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.geometry = geometry
        self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups
        self.padding = layer.padding
        self.kernel_size = layer.kernel_size
        self.planes, self.out_channels = layer.planes, layer.out_channels
        with torch.no_grad():
            signs = hard_sign(layer.weight.detach()).float()  # (H, cin, kh, kw)
            k = layer.planes
            maps = layer.out_channels // k
            s = torch.ones(layer.out_channels) if scale is None else scale.detach().float()
            bias = layer.bias.detach().float() if layer.bias is not None else None
            if shift is not None:  # folded BN: bias' = b * s + shift
                bias = shift.detach().float() + (0.0 if bias is None else bias * s)
            combine = s.reshape(maps, k, 1) * layer.mfilter.detach().float().reshape(1, k, -1)
            if self.form in (Form.COLS, Form.GRID):
                combine = combine.expand(maps, k, geometry.positions)
            self.register_buffer("bias", bias)
            self.register_buffer("combine", combine.contiguous())
            self.register_buffer("binary", self.layout(signs, self.combine).contiguous())

    def layout(self, signs: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """The ``binary`` buffer this form reads, from the ±1 filters and ``A``."""
        raise NotImplementedError

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, H, K, Ho, Wo)`` -> ``(N, out, Ho, Wo)`` plus bias."""
        n, _, _, ho, wo = y.shape
        y = y.reshape(n, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.geometry.pads
        if top or bottom or left or right:
            return F.pad(x, (left, right, top, bottom))
        return x.contiguous()

    def extra_repr(self) -> str:
        return f"form={self.form.value}, out={self.out_channels}, planes={self.planes}"


class DenseForm(FactoredConv2d):
    """One conv with ``Q * s`` (docs/design.md section 2.3), BatchNorm folded."""

    form = Form.DENSE

    def layout(self, signs: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        maps, cin, kh, kw = signs.shape
        k = self.planes
        if combine.shape[2] > 1:
            a = combine.reshape(maps, k, 1, kh, kw)
        else:
            a = combine.reshape(maps, k, 1, 1, 1)
        return (signs.unsqueeze(1) * a).reshape(maps * k, cin, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x, self.binary, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class ScaleForm(FactoredConv2d):
    """M constant over the kernel (1x1, MCNs-1): ``z = conv(x, B)`` with H filters, then
    ``y[h*K + j] = A[h, j] * z[h] + bias``."""

    form = Form.SCALE

    def layout(self, signs: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        return signs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(x, self.binary, None, self.stride, self.padding, self.dilation, self.groups)
        n, maps, ho, wo = z.shape
        a = self.combine.reshape(1, maps, self.planes, 1, 1)
        if self.bias is None:
            return (z.unsqueeze(2) * a).reshape(n, self.out_channels, ho, wo)
        b = self.bias.reshape(1, maps, self.planes, 1, 1)
        return torch.addcmul(b, z.unsqueeze(2), a).reshape(n, self.out_channels, ho, wo)


class ColsForm(FactoredConv2d):
    """The kh*kw shifted, strided windows of the padded input gathered once (im2col with the
    positions outermost), one batched matmul per position gives z, one combines over p."""

    form = Form.COLS

    def layout(self, signs: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        maps, cin, kh, kw = signs.shape
        g = self.groups  # (g, P, H_g, cin)
        return signs.reshape(g, maps // g, cin, kh * kw).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = self.padded(x)
        n, c, hp, wp = xp.shape
        ho, wo = conv_output_hw((hp, wp), self.kernel_size, self.stride, self.dilation)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        g, maps = self.groups, self.combine.shape[0]
        cin = c // g
        cols = xp.as_strided(
            (n, g, kh, kw, cin, ho, wo),
            (c * hp * wp, cin * hp * wp, dh * wp, dw, hp * wp, sh * wp, sw),
        ).reshape(n, g, kh * kw, cin, ho * wo)
        z = torch.matmul(self.binary, cols)  # (N, g, P, H_g, L)
        a = self.combine.reshape(g, maps // g, self.planes, kh * kw)
        y = torch.einsum("ghjp,ngphl->nghjl", a, z)
        return self.finish(y.reshape(n, maps, self.planes, ho, wo))


class GridForm(FactoredConv2d):
    """Groups 1: a 1x1 conv of the padded input to ``P*H`` channels over the whole padded grid,
    then the shifted windows of z (a strided view, no copy) are combined."""

    form = Form.GRID

    def layout(self, signs: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        maps, cin, kh, kw = signs.shape  # channel p*H + h
        return signs.permute(2, 3, 0, 1).reshape(kh * kw * maps, cin, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = self.padded(x)
        n, _, hp, wp = xp.shape
        ho, wo = conv_output_hw((hp, wp), self.kernel_size, self.stride, self.dilation)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        maps = self.combine.shape[0]
        z = F.conv2d(xp, self.binary).contiguous()  # (N, P*H, Hp, Wp)
        plane = hp * wp
        step_a, step_b = kw * maps * plane + dh * wp, maps * plane + dw
        win = z.as_strided(
            (n, kh, kw, maps, ho, wo),
            (kh * kw * maps * plane, step_a, step_b, plane, sh * wp, sw),
        )
        a = self.combine.reshape(maps, self.planes, kh, kw)
        return self.finish(torch.einsum("hjab,nabhxy->nhjxy", a, win))


FORM_CLASSES: dict[Form, type[FactoredConv2d]] = {
    cls.form: cls for cls in (DenseForm, ScaleForm, ColsForm, GridForm)
}


def create_factored(
    layer: MCConv2d,
    plan: LayerPlan,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> FactoredConv2d:
    """The module of ``plan.form`` for ``layer`` (``scale``/``shift``: a folded eval BatchNorm,
    ``bn(y) = y * scale + shift``).

    Raises:
        ConfigError: the form does not fit the layer (``scale`` needs M constant over the
            kernel, ``grid`` needs groups 1).
    """
    geo = plan.geometry
    if plan.form is Form.SCALE and geo.full_m:
        raise ConfigError("form 'scale' needs a 1x1 conv or MCNs-1")
    if plan.form is Form.GRID and geo.groups != 1:
        raise ConfigError("form 'grid' needs groups == 1")
    return FORM_CLASSES[plan.form](layer, geo, scale, shift)


__all__ = [
    "FORM_CLASSES",
    "ColsForm",
    "DenseForm",
    "FactoredConv2d",
    "GridForm",
    "ScaleForm",
    "create_factored",
]
