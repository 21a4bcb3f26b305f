"""Run MCN layers in factored form (docs/design.md section 4.8): K times fewer conv MACs.

With binary filters ``B = sign(C)`` of shape ``(H, in // groups, kh, kw)``, ``H = out / K``, and
the M-Filter ``M`` of shape ``(K, kh, kw)`` (section 2.3), the dense output

    y[h*K + j](o) = sum_{c, p} B[h, c, p] * M[j, p] * x[c, o*s + p*d]

splits into ``z[h, p](o) = sum_c B[h, c, p] * x[c, o*s + p*d]`` (a convolution with H binary
filters per kernel position p) and ``y[h*K + j](o) = sum_p M[j, p] * z[h, p](o)`` (out * kh*kw
MACs per pixel). A following eval BatchNorm folds exactly: its scale ``s`` goes into a
per-map combination ``A[h, j, p] = s[h*K + j] * M[j, p]``, its shift into the bias.

Forms of one layer (`FactoredConv2d.mode`):

- ``scale``: 1x1 convs and MCNs-1 (M constant over p): ``z = conv(x, B)`` with H filters, then
  ``y[h*K + j] = A[h, j] * z[h] + bias``.
- ``cols``: the input is padded and its kh*kw shifted (strided) windows are gathered once
  (im2col with the positions outermost); one batched matmul per position gives z, one batched
  matmul over p combines.
- ``grid`` (groups == 1): a 1x1 conv of the padded input to ``kh*kw*H`` channels over the whole
  padded grid, then the shifted windows of z (a strided view, no copy) are combined. Cheaper
  than ``cols`` at large maps with stride 1; wasteful when strided (z is computed everywhere).
- ``dense``: the ordinary conv with ``Q * s`` (section 2.3), when it is faster.

`optimize_for_inference` picks per layer by `choose_mode` (a rule from the layer shape, fitted
to timings on a 1-thread CPU, see README "Fast inference") or by timing both on the layer's own
input (``choose="time"``). Numbers only: nothing here prints.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcn_compress.errors import ConfigError
from mcn_compress.module_utils import input_sizes, resolve_input_shape, set_submodule
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.nn.sign import hard_sign
from mcn_compress.passes.fold_bn import conv_batchnorm_pairs, folding_factors

MODES = ("scale", "cols", "grid", "dense")
CHOICES = ("rule", "time", "factored", "dense")


def explicit_padding(layer: MCConv2d) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of ``layer`` (``"same"`` pads extra at the
    bottom/right, as PyTorch does)."""
    kh, kw = layer.kernel_size
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        th, tw = layer.dilation[0] * (kh - 1), layer.dilation[1] * (kw - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    ph, pw = layer.padding  # type: ignore[misc]
    return (int(ph), int(ph), int(pw), int(pw))


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """Shape facts of one MCConv2d at a given input size, enough to cost its forms."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    groups: int
    planes: int
    full_m: bool  # M varies over the kernel positions (not MCNs-1, not 1x1)
    input_hw: tuple[int, int]

    @property
    def positions(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def padded_hw(self) -> tuple[int, int]:
        top, bottom, left, right = self.pads
        return (self.input_hw[0] + top + bottom, self.input_hw[1] + left + right)

    @property
    def output_hw(self) -> tuple[int, int]:
        hp, wp = self.padded_hw
        ho = (hp - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (wp - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        return (ho, wo)

    def macs(self, mode: str) -> int:
        """Multiply-accumulates per image of ``mode`` (docs/design.md section 4.8)."""
        ho, wo = self.output_hw
        pixels = ho * wo
        cin = self.in_channels // self.groups
        maps = self.out_channels // self.planes
        dense = self.out_channels * cin * self.positions * pixels
        if mode == "dense":
            return dense
        if mode == "scale":
            return dense // self.planes + self.out_channels * pixels
        if mode == "grid":
            hp, wp = self.padded_hw
            binary = maps * self.positions * cin * hp * wp
            return binary + self.out_channels * self.positions * pixels
        return dense // self.planes + self.out_channels * self.positions * pixels

    def weight_floats(self, mode: str) -> int:
        """Float weights a runtime holds for ``mode``: Q (dense), else the ±1 filters plus the
        combination A (the folded bias not counted)."""
        dense = self.out_channels * (self.in_channels // self.groups) * self.positions
        if mode == "dense":
            return dense
        return dense // self.planes + self.out_channels * (1 if mode == "scale" else self.positions)


def geometry(layer: MCConv2d, input_hw: tuple[int, int]) -> LayerGeometry:
    return LayerGeometry(
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel=layer.kernel_size,
        stride=layer.stride,
        dilation=layer.dilation,
        pads=explicit_padding(layer),
        groups=layer.groups,
        planes=layer.planes,
        full_m=not layer.mcn1 and layer.kernel_size != (1, 1),
        input_hw=input_hw,
    )


COPY_COST = 32  # MACs that one gathered float costs, fitted to 1-thread CPU timings


def choose_mode(geo: LayerGeometry) -> str:
    """The rule (docs/design.md section 4.8): ``scale`` whenever M is constant over the kernel;
    for a full M, ``dense`` when K = 1 or the per-group input is under 16 channels (too little
    GEMM work to save); ``cols`` when strided or grouped; else the cheaper of ``grid`` and
    ``cols`` by a cost model: ``grid`` computes z over the padded grid,
    ``H * cin * (Hp*Wp - L)`` extra MACs per position, where ``cols`` gathers ``cin`` input
    floats per output pixel and position instead of ``H``, ``COPY_COST`` MACs each."""
    if not geo.full_m:
        return "scale"
    cin = geo.in_channels // geo.groups
    if geo.planes == 1 or cin < 16:
        return "dense"
    if geo.groups != 1 or geo.stride != (1, 1):
        return "cols"
    maps = geo.out_channels // geo.planes
    (ho, wo), (hp, wp) = geo.output_hw, geo.padded_hw
    grid_extra = maps * cin * (hp * wp - ho * wo)
    cols_extra = COPY_COST * (cin - maps) * ho * wo
    return "grid" if grid_extra < cols_extra else "cols"


class FactoredConv2d(nn.Module):
    """An eval-only MCConv2d (+ folded BatchNorm) in one of the forms of `MODES`.

    Buffers: ``binary`` (the ±1 filters in the layout ``mode`` reads, or the dense ``Q * s`` for
    ``dense``), ``combine`` (``A[h, j, p] = s[h*K + j] * M[j, p]``), ``bias`` (out,) or None.
    """

    def __init__(
        self,
        layer: MCConv2d,
        mode: str,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        geo = geometry(layer, (1, 1))
        if mode == "scale" and geo.full_m:
            raise ConfigError("mode 'scale' needs a 1x1 conv or MCNs-1")
        if mode == "grid" and layer.groups != 1:
            raise ConfigError("mode 'grid' needs groups == 1")
        self.mode = mode
        self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups
        self.padding = layer.padding
        self.pads = geo.pads
        self.kernel_size = layer.kernel_size
        self.planes, self.out_channels = layer.planes, layer.out_channels
        with torch.no_grad():
            signs = hard_sign(layer.weight.detach()).float()  # (H, cin, kh, kw)
            mfilter = layer.mfilter.detach().float()
            k = layer.planes
            maps = layer.out_channels // k
            s = torch.ones(layer.out_channels) if scale is None else scale.detach().float()
            bias = layer.bias.detach().float() if layer.bias is not None else None
            if shift is not None:  # folded BN: bias' = b * s + shift
                bias = shift.detach().float() + (0.0 if bias is None else bias * s)
            combine = s.reshape(maps, k, 1) * mfilter.reshape(1, k, -1)  # (H, K, P|1)
            if mode in ("cols", "grid"):
                combine = combine.expand(maps, k, layer.kernel_size[0] * layer.kernel_size[1])
            self.register_buffer("bias", bias)
            self.register_buffer("combine", combine.contiguous())
            self.register_buffer("binary", self._layout(signs, combine, mode).contiguous())

    def _layout(self, signs: torch.Tensor, combine: torch.Tensor, mode: str) -> torch.Tensor:
        maps, cin, kh, kw = signs.shape
        if mode == "dense":
            k = self.planes
            per_position = combine.reshape(maps, k, 1, kh, kw) if combine.shape[2] > 1 else None
            a = per_position if per_position is not None else combine.reshape(maps, k, 1, 1, 1)
            return (signs.unsqueeze(1) * a).reshape(maps * k, cin, kh, kw)
        if mode == "scale":
            return signs
        if mode == "grid":  # channel p*H + h
            return signs.permute(2, 3, 0, 1).reshape(kh * kw * maps, cin, 1, 1)
        g = self.groups  # cols: (g, P, H_g, cin)
        return signs.reshape(g, maps // g, cin, kh * kw).permute(0, 3, 1, 2)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.pads
        if top or bottom or left or right:
            return F.pad(x, (left, right, top, bottom))
        return x.contiguous()

    def _out_hw(self, hp: int, wp: int) -> tuple[int, int]:
        kh, kw = self.kernel_size
        ho = (hp - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (wp - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return ho, wo

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, H, K, Ho, Wo)`` -> ``(N, out, Ho, Wo)`` plus bias."""
        n, _, _, ho, wo = y.shape
        y = y.reshape(n, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return F.conv2d(
                x, self.binary, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        maps, k = self.combine.shape[0], self.planes
        if self.mode == "scale":
            z = F.conv2d(
                x, self.binary, None, self.stride, self.padding, self.dilation, self.groups
            )
            n, _, ho, wo = z.shape
            a = self.combine.reshape(1, maps, k, 1, 1)
            if self.bias is None:
                return (z.unsqueeze(2) * a).reshape(n, self.out_channels, ho, wo)
            b = self.bias.reshape(1, maps, k, 1, 1)
            return torch.addcmul(b, z.unsqueeze(2), a).reshape(n, self.out_channels, ho, wo)
        xp = self._padded(x)
        n, c, hp, wp = xp.shape
        ho, wo = self._out_hw(hp, wp)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        if self.mode == "grid":
            z = F.conv2d(xp, self.binary).contiguous()  # (N, P*H, Hp, Wp)
            plane = hp * wp
            win = z.as_strided(
                (n, kh, kw, maps, ho, wo),
                (
                    kh * kw * maps * plane,
                    kw * maps * plane + dh * wp,
                    maps * plane + dw,
                    plane,
                    sh * wp,
                    sw,
                ),
            )
            y = torch.einsum("hjab,nabhxy->nhjxy", self.combine.reshape(maps, k, kh, kw), win)
            return self._finish(y)
        g = self.groups
        cin = c // g
        cols = xp.as_strided(
            (n, g, kh, kw, cin, ho, wo),
            (c * hp * wp, cin * hp * wp, dh * wp, dw, hp * wp, sh * wp, sw),
        ).reshape(n, g, kh * kw, cin, ho * wo)
        z = torch.matmul(self.binary, cols)  # (N, g, P, H_g, L)
        a = self.combine.reshape(g, maps // g, k, kh * kw)
        y = torch.einsum("ghjp,ngphl->nghjl", a, z)
        return self._finish(y.reshape(n, maps, k, ho, wo))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, out={self.out_channels}, planes={self.planes}"


@dataclasses.dataclass(frozen=True)
class FactoredLayer:
    """One converted layer of an optimised model: the form chosen and what it costs."""

    name: str
    mode: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    planes: int
    input_hw: tuple[int, int]
    dense_macs: int
    macs: int
    dense_weight_floats: int = 0
    weight_floats: int = 0
    folded_batchnorm: str | None = None
    dense_ms: float | None = None
    factored_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FactoredSummary:
    """What `optimize_for_inference` did, one row per MCConv2d, in module order."""

    layers: tuple[FactoredLayer, ...]
    choose: str
    input_shape: tuple[int, int, int]

    @property
    def dense_macs(self) -> int:
        return sum(row.dense_macs for row in self.layers)

    @property
    def macs(self) -> int:
        return sum(row.macs for row in self.layers)

    @property
    def dense_weight_floats(self) -> int:
        return sum(row.dense_weight_floats for row in self.layers)

    @property
    def weight_floats(self) -> int:
        return sum(row.weight_floats for row in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "choose": self.choose,
            "input_shape": list(self.input_shape),
            "dense_macs": self.dense_macs,
            "macs": self.macs,
            "layers": [row.to_dict() for row in self.layers],
        }


def _time_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def _candidates(geo: LayerGeometry) -> list[str]:
    if not geo.full_m:
        return ["scale"]
    return ["cols", "grid"] if geo.groups == 1 else ["cols"]


def optimize_for_inference(
    model: nn.Module,
    *,
    choose: str = "rule",
    input_size: int | Sequence[int] | None = None,
    batch: int = 1,
    repeats: int = 5,
) -> nn.Module:
    """An eval-only deep copy of ``model`` whose MCConv2d run factored (docs/design.md section 4.8).

    Every MCConv2d becomes a `FactoredConv2d`; an eval BatchNorm that alone consumes its output
    is folded into it (exactly: scale into the combination, shift into the bias). The form per
    layer: ``choose="rule"`` (default) applies `choose_mode`; ``"time"`` times dense and each
    factored form on the layer's input (``batch`` x the shape met on one forward of an input of
    ``input_size``, median of ``repeats``) and keeps the fastest; ``"factored"`` forces the
    rule's factored form, ``"dense"`` the dense conv (with BatchNorm folded). The result carries
    a `FactoredSummary` as ``model.factored_summary``; gradients are not supported.

    Raises:
        ConfigError: an unknown ``choose`` or a bad ``input_size``.
    """
    if choose not in CHOICES:
        raise ConfigError(f"choose must be one of {', '.join(CHOICES)}, got {choose!r}")
    work = copy.deepcopy(model).eval()
    for param in work.parameters():
        param.requires_grad_(False)
    shape = resolve_input_shape(work, input_size)
    param = next(work.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    layer_names = [n for n, m in work.named_modules() if isinstance(m, MCConv2d)]
    sizes = input_sizes(work, example, layer_names)
    pairs = conv_batchnorm_pairs(work, MCConv2d)
    modules = dict(work.named_modules())
    rows = []
    for name, layer in list(modules.items()):
        if not isinstance(layer, MCConv2d):
            continue
        geo = geometry(layer, sizes.get(name, (1, 1)))
        bn_name, scale, shift = None, None, None
        if name in pairs:
            bn_name, replacement = pairs[name]
            scale, shift = folding_factors(modules[bn_name])
        mode, times = _decide(layer, geo, choose, scale, shift, batch, repeats, device)
        set_submodule(work, name, FactoredConv2d(layer, mode, scale, shift).to(device))
        if bn_name is not None:
            set_submodule(work, bn_name, replacement)
        rows.append(
            FactoredLayer(
                name=name,
                mode=mode,
                in_channels=layer.in_channels,
                out_channels=layer.out_channels,
                kernel=layer.kernel_size,
                stride=layer.stride,
                groups=layer.groups,
                planes=layer.planes,
                input_hw=geo.input_hw,
                dense_macs=geo.macs("dense"),
                macs=geo.macs(mode),
                dense_weight_floats=geo.weight_floats("dense"),
                weight_floats=geo.weight_floats(mode),
                folded_batchnorm=bn_name,
                dense_ms=times.get("dense"),
                factored_ms=min((t for m, t in times.items() if m != "dense"), default=None),
            )
        )
    work.factored_summary = FactoredSummary(tuple(rows), choose, shape)
    return work


def _decide(
    layer: MCConv2d,
    geo: LayerGeometry,
    choose: str,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    batch: int,
    repeats: int,
    device: torch.device,
) -> tuple[str, dict[str, float]]:
    rule = choose_mode(geo)
    if choose == "rule":
        return rule, {}
    if choose == "dense":
        return "dense", {}
    if choose == "factored":
        return (rule if rule != "dense" else _candidates(geo)[0]), {}
    x = torch.randn(batch, layer.in_channels, *geo.input_hw, device=device)
    times = {
        mode: _time_ms(FactoredConv2d(layer, mode, scale, shift).to(device), x, repeats)
        for mode in ["dense", *_candidates(geo)]
    }
    return min(times, key=lambda m: times[m]), times


def factored_summary(model: nn.Module) -> FactoredSummary | None:
    """The `FactoredSummary` `optimize_for_inference` attached to ``model``, or None."""
    found = getattr(model, "factored_summary", None)
    return found if isinstance(found, FactoredSummary) else None


def dense_conv_weight_floats(model: nn.Module) -> int:
    """Float conv weights a runtime holds for the dense model: every float conv's weight and
    every MCConv2d's Q, ``out * in // groups * kh * kw`` (docs/design.md section 4.8)."""
    total = 0
    for module in model.modules():
        if isinstance(module, MCConv2d):
            total += module.out_channels * module.weight[0].numel()
        elif isinstance(module, nn.Conv2d):
            total += module.weight.numel()
    return total


def factored_profile(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    conv_macs: int | None,
    latency: Any = None,
) -> dict[str, Any]:
    """Dense and factored costs of an MCN model for one image of ``input_shape`` (JSON-ready):
    ``conv_macs`` (all convs, factored where `choose_mode` says), ``dense_weight_bytes`` and
    ``weight_bytes`` (float32 conv weights a runtime holds), ``latency_ms`` (``latency(fast)``
    when a timing function is given) and per-layer ``layers`` {name: FactoredLayer dict}.
    ``conv_macs`` is the dense model's total (`mcn_compress.profile.conv_macs`)."""
    fast = optimize_for_inference(model, input_size=input_shape)
    summary = fast.factored_summary
    dense = dense_conv_weight_floats(model)
    return {
        "dense_conv_macs": conv_macs,
        "conv_macs": None if conv_macs is None else conv_macs - summary.dense_macs + summary.macs,
        "dense_weight_bytes": 4 * dense,
        "weight_bytes": 4 * (dense - summary.dense_weight_floats + summary.weight_floats),
        "latency_ms": latency(fast) if latency is not None else None,
        "layers": {row.name: row.to_dict() for row in summary.layers},
    }
