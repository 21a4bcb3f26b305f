"""The factored-compute planner (docs/design.md section 4.8): one typed plan per MCN layer.

A `LayerPlan` holds everything a back end needs to run one converted conv: its `Geometry`
(channels, kernel, stride, dilation, explicit padding, groups, planes, input and output size),
the `Form` chosen for it, the thread count it was chosen for, and what the form costs (conv
MACs and float weights held). `plan_layer` builds it once; the eager modules
(`passes.factored_forms`, `passes.factored`) and the ONNX emitter (`formats.onnx_factored`)
both consume it, so padding, output sizes and the choice of form are worked out in one place.

The rule (`choose_form`) depends on the back end and on the threads: a factored form replaces
one large convolution by several smaller operations, which gain less from a second thread, so
at 2+ threads a layer must save more MACs to be worth factoring (thresholds in `Tunables`,
fitted to timings on a 2-core CPU, docs/design.md section 4.8). Numbers only: nothing here
prints or touches tensors.
"""

from __future__ import annotations

import dataclasses
import os
from enum import Enum
from typing import TYPE_CHECKING, Any

from mcn_compress.errors import ConfigError

if TYPE_CHECKING:
    from mcn_compress.nn.mcconv import MCConv2d


class Form(str, Enum):
    """How one converted conv runs (docs/design.md section 4.8)."""

    DENSE = "dense"  # one conv with Q (times the folded BatchNorm scale)
    SCALE = "scale"  # M constant over the kernel: H binary filters, then a per-channel scale
    COLS = "cols"  # per kernel position a window of the padded input, then the combination
    GRID = "grid"  # one 1x1 conv to P*H channels over the padded grid, then shifted windows


class Compute(str, Enum):
    """How forms are picked for a whole model."""

    AUTO = "auto"  # `choose_form`: factored where the rule expects it to be faster
    FACTORED = "factored"  # every layer factored (the rule's factored form)
    DENSE = "dense"  # every layer dense (BatchNorm still folded)
    TIME = "time"  # time dense and each factored form on the layer's own input (eager only)


class Backend(str, Enum):
    """The runtime a plan is made for."""

    TORCH = "torch"  # PyTorch eager (`optimize_for_inference`)
    ONNXRUNTIME = "onnxruntime"  # the factored ONNX graph (`export_onnx`)
    ONNXRUNTIME_INT8 = "onnxruntime-int8"  # the QDQ graph, int8 activations (section 4.10)


def enum_value(kind: type[Enum], value: object, what: str) -> Any:
    """``value`` as a member of ``kind`` (members and their string values accepted), else a
    `ConfigError` listing the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(member.value) for member in kind)  # type: ignore[attr-defined]
        raise ConfigError(f"{what} must be one of {choices}, got {value!r}") from None


def default_threads() -> int:
    """The CPU cores this process may use (the default thread count of a plan)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def resolve_pads(
    padding: object,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    input_hw: tuple[int, int],
) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of a conv.

    ``padding`` is PyTorch's ``(ph, pw)``, ``"valid"`` or ``"same"`` (stride 1; the odd pixel
    goes to the bottom/right), or ONNX's ``auto_pad`` ``"SAME_UPPER"`` / ``"SAME_LOWER"`` (output
    ``ceil(input / stride)``; the odd pixel at the end, or at the start) / ``"VALID"``.
    """
    text = padding.upper() if isinstance(padding, str) else None
    if text == "VALID":
        return (0, 0, 0, 0)
    if text in ("SAME", "SAME_UPPER", "SAME_LOWER"):
        totals = []
        for size, s, d, k in zip(input_hw, stride, dilation, kernel, strict=True):
            out = -(-size // s)  # ceil; "same" (PyTorch) has stride 1, so out = size
            totals.append(max((out - 1) * s + (k - 1) * d + 1 - size, 0))
        (th, tw), lower = totals, text == "SAME_LOWER"
        top, left = (th - th // 2, tw - tw // 2) if lower else (th // 2, tw // 2)
        return (top, th - top, left, tw - left)
    if isinstance(padding, str):
        raise ConfigError(f"unknown conv padding {padding!r}")
    ph, pw = padding  # type: ignore[misc]
    return (int(ph), int(ph), int(pw), int(pw))


def conv_output_hw(
    padded_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """``(padded - d*(k - 1) - 1) // s + 1`` per axis: a conv's output size."""
    sizes = zip(padded_hw, dilation, kernel, stride, strict=True)
    ho, wo = ((p - d * (k - 1) - 1) // s + 1 for p, d, k, s in sizes)
    return (ho, wo)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Shape facts of one converted conv at a given input size, enough to cost its forms."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, bottom, left, right
    groups: int
    planes: int
    full_m: bool  # M varies over the kernel positions (not MCNs-1, not 1x1)
    input_hw: tuple[int, int]

    @property
    def positions(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def maps(self) -> int:
        """H = out / K: the binary filters."""
        return self.out_channels // self.planes

    @property
    def padded_hw(self) -> tuple[int, int]:
        top, bottom, left, right = self.pads
        return (self.input_hw[0] + top + bottom, self.input_hw[1] + left + right)

    @property
    def output_hw(self) -> tuple[int, int]:
        return conv_output_hw(self.padded_hw, self.kernel, self.stride, self.dilation)

    def macs(self, form: Form) -> int:
        """Multiply-accumulates per image of ``form`` (docs/design.md section 4.8)."""
        ho, wo = self.output_hw
        pixels = ho * wo
        cin = self.in_channels // self.groups
        dense = self.out_channels * cin * self.positions * pixels
        if form is Form.DENSE:
            return dense
        if form is Form.SCALE:
            return dense // self.planes + self.out_channels * pixels
        if form is Form.GRID:
            hp, wp = self.padded_hw
            binary = self.maps * self.positions * cin * hp * wp
            return binary + self.out_channels * self.positions * pixels
        return dense // self.planes + self.out_channels * self.positions * pixels

    def weight_floats(self, form: Form) -> int:
        """Float weights a runtime holds for ``form``: Q (dense), else the ±1 filters plus the
        combination A (the folded bias not counted)."""
        dense = self.out_channels * (self.in_channels // self.groups) * self.positions
        if form is Form.DENSE:
            return dense
        per_map = 1 if form is Form.SCALE else self.positions
        return dense // self.planes + self.out_channels * per_map

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "output_hw": list(self.output_hw)}


def layer_geometry(layer: MCConv2d, input_hw: tuple[int, int]) -> Geometry:
    """The `Geometry` of ``layer`` on inputs of ``input_hw``."""
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    return Geometry(
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        pads=resolve_pads(layer.padding, kernel, stride, dilation, input_hw),
        groups=layer.groups,
        planes=layer.planes,
        full_m=not layer.mcn1 and kernel != (1, 1),
        input_hw=input_hw,
    )


@dataclasses.dataclass(frozen=True)
class Tunables:
    """The rule's parameters (docs/design.md section 4.8), passed to the planner explicitly.

    ``copy_cost``: MACs that one gathered float costs in eager ``cols`` (1-thread CPU fit).
    ``onnx_min_saved_macs``: the conv MACs per image, per onnxruntime thread, a layer must save
    for its factored ONNX form to be chosen. onnxruntime's dense convs run in a blocked layout
    with fused activations and spread over the threads; a factored layer adds a dozen nodes
    whose copies (windows, concatenation, layout reorders) mostly run on one thread, so the
    time it saves shrinks as 1/threads while its overhead stays: the threshold grows with the
    thread count (fitted to timings on a 2-core CPU, docs/design.md section 4.8).
    ``onnx_conv_max_pixels``: ONNX ``cols`` convolves its windows by a 1x1 ``Conv`` up to this
    many output pixels (onnxruntime's blocked layout), else by ``MatMul``.
    """

    copy_cost: int = 32
    onnx_min_saved_macs: int = 8_000_000
    onnx_conv_max_pixels: int = 1024
    int8_scale_min_cin: int = 64
    int8_grid_min_cin: int = 128

    def min_saved_macs(self, threads: int) -> int:
        return self.onnx_min_saved_macs * max(threads, 1)

    def int8_min_cin(self, form: Form, threads: int) -> int:
        """The input channels a layer needs for its int8 ``form`` (``scale`` or ``grid``) to
        beat the dense int8 conv at ``threads`` (docs/design.md section 4.10): the copies a
        factored int8 form adds cost about ``out`` bytes per pixel (``scale``) or ``P * H``
        (``grid``) and run on one thread, the MACs it saves grow with ``cin`` and spread over
        the threads, so the bar grows with the threads."""
        base = self.int8_scale_min_cin if form is Form.SCALE else self.int8_grid_min_cin
        return base * max(threads, 1)


DEFAULT_TUNABLES = Tunables()


def candidates(geo: Geometry) -> list[Form]:
    """The factored forms ``geo`` allows: ``scale`` when M is constant over the kernel, else
    ``cols`` and (groups 1) ``grid``."""
    if not geo.full_m:
        return [Form.SCALE]
    return [Form.COLS, Form.GRID] if geo.groups == 1 else [Form.COLS]


def rule_form(geo: Geometry, tunables: Tunables = DEFAULT_TUNABLES) -> Form:
    """The eager rule: ``scale`` whenever M is constant over the kernel; for a full M, ``dense``
    when K = 1 or the per-group input is under 16 channels (too little GEMM work to save);
    ``cols`` when strided or grouped; else the cheaper of ``grid`` and ``cols`` by a cost model:
    ``grid`` computes z over the padded grid, ``H * cin * (Hp*Wp - L)`` extra MACs per position,
    where ``cols`` gathers ``cin`` input floats per output pixel and position instead of ``H``,
    ``copy_cost`` MACs each."""
    if not geo.full_m:
        return Form.SCALE
    cin = geo.in_channels // geo.groups
    if geo.planes == 1 or cin < 16:
        return Form.DENSE
    if geo.groups != 1 or geo.stride != (1, 1):
        return Form.COLS
    (ho, wo), (hp, wp) = geo.output_hw, geo.padded_hw
    grid_extra = geo.maps * cin * (hp * wp - ho * wo)
    cols_extra = tunables.copy_cost * (cin - geo.maps) * ho * wo
    return Form.GRID if grid_extra < cols_extra else Form.COLS


def int8_candidate(geo: Geometry) -> Form:
    """The one factored int8 form ``geo`` allows (docs/design.md section 4.10): ``scale`` when
    M is constant over the kernel, ``grid`` for a full M at stride 1, else ``dense`` (strided
    or grouped full-M convs, K = 1)."""
    if geo.groups != 1 or geo.planes == 1:
        return Form.DENSE
    if not geo.full_m:
        return Form.SCALE
    return Form.GRID if geo.stride == (1, 1) else Form.DENSE


def int8_rule(geo: Geometry, threads: int = 1, tunables: Tunables = DEFAULT_TUNABLES) -> Form:
    """The int8 rule: `int8_candidate` when the layer has at least
    ``tunables.int8_min_cin(form, threads)`` input channels, else ``dense``."""
    form = int8_candidate(geo)
    if form is not Form.DENSE and geo.in_channels < tunables.int8_min_cin(form, threads):
        return Form.DENSE
    return form


def choose_form(
    geo: Geometry,
    backend: Backend = Backend.TORCH,
    threads: int = 1,
    tunables: Tunables = DEFAULT_TUNABLES,
) -> Form:
    """The form `Compute.AUTO` picks: `rule_form`; for onnxruntime, ``dense`` unless the
    factored form saves at least ``tunables.min_saved_macs(threads)`` conv MACs per image;
    for onnxruntime with int8 activations, `int8_rule`."""
    if backend is Backend.ONNXRUNTIME_INT8:
        return int8_rule(geo, threads, tunables)
    form = rule_form(geo, tunables)
    if backend is Backend.ONNXRUNTIME and form is not Form.DENSE:
        if geo.macs(Form.DENSE) - geo.macs(form) < tunables.min_saved_macs(threads):
            return Form.DENSE
    return form


def forced_factored(geo: Geometry, tunables: Tunables = DEFAULT_TUNABLES) -> Form:
    """The form `Compute.FACTORED` picks: the rule's, or its first factored candidate."""
    form = rule_form(geo, tunables)
    return form if form is not Form.DENSE else candidates(geo)[0]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One converted conv: where it is, its geometry, the form it runs in and what it costs."""

    name: str
    geometry: Geometry
    form: Form
    folded_batchnorm: str | None = None  # the eval BatchNorm folded into it, if any
    times_ms: dict[str, float] | None = None  # per form, when timed (`Compute.TIME`)

    @property
    def dense_macs(self) -> int:
        return self.geometry.macs(Form.DENSE)

    @property
    def macs(self) -> int:
        return self.geometry.macs(self.form)

    @property
    def dense_weight_floats(self) -> int:
        return self.geometry.weight_floats(Form.DENSE)

    @property
    def weight_floats(self) -> int:
        return self.geometry.weight_floats(self.form)

    def to_dict(self) -> dict[str, Any]:
        geo = self.geometry
        return {
            "name": self.name,
            "form": self.form.value,
            "in_channels": geo.in_channels,
            "out_channels": geo.out_channels,
            "kernel": list(geo.kernel),
            "stride": list(geo.stride),
            "groups": geo.groups,
            "planes": geo.planes,
            "input_hw": list(geo.input_hw),
            "output_hw": list(geo.output_hw),
            "pads": list(geo.pads),
            "dense_macs": self.dense_macs,
            "macs": self.macs,
            "dense_weight_floats": self.dense_weight_floats,
            "weight_floats": self.weight_floats,
            "folded_batchnorm": self.folded_batchnorm,
            "times_ms": self.times_ms,
        }


@dataclasses.dataclass(frozen=True)
class InferencePlan:
    """The plan of a whole model: one `LayerPlan` per converted conv, in module order."""

    backend: Backend
    compute: Compute
    threads: int
    input_shape: tuple[int, ...]  # (C, H, W) of one input
    layers: tuple[LayerPlan, ...]

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

    @property
    def factored(self) -> tuple[str, ...]:
        """Names of the layers that run factored."""
        return tuple(row.name for row in self.layers if row.form is not Form.DENSE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend.value,
            "compute": self.compute.value,
            "threads": self.threads,
            "input_shape": list(self.input_shape),
            "dense_macs": self.dense_macs,
            "macs": self.macs,
            "dense_weight_floats": self.dense_weight_floats,
            "weight_floats": self.weight_floats,
            "layers": [row.to_dict() for row in self.layers],
        }


def plan_layer(
    name: str,
    geo: Geometry,
    compute: Compute,
    backend: Backend,
    threads: int,
    *,
    tunables: Tunables = DEFAULT_TUNABLES,
    folded_batchnorm: str | None = None,
) -> LayerPlan:
    """The plan of one layer for ``compute`` other than `Compute.TIME` (which needs the layer
    itself; `passes.factored` times the candidates and builds the plan from the winner)."""
    if compute is Compute.DENSE:
        form = Form.DENSE
    elif compute is Compute.FACTORED and backend is Backend.ONNXRUNTIME_INT8:
        form = int8_candidate(geo)
    elif compute is Compute.FACTORED:
        form = forced_factored(geo, tunables)
    elif compute is Compute.AUTO:
        form = choose_form(geo, backend, threads, tunables)
    else:
        raise ConfigError("compute 'time' measures each layer: plan it through its back end")
    return LayerPlan(name, geo, form, folded_batchnorm)


__all__ = [
    "DEFAULT_TUNABLES",
    "Backend",
    "Compute",
    "Form",
    "Geometry",
    "InferencePlan",
    "LayerPlan",
    "Tunables",
    "candidates",
    "choose_form",
    "conv_output_hw",
    "default_threads",
    "enum_value",
    "forced_factored",
    "int8_candidate",
    "int8_rule",
    "layer_geometry",
    "plan_layer",
    "resolve_pads",
    "rule_form",
]
