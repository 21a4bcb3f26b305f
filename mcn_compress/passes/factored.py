"""`optimize_for_inference`: run MCN layers in factored form (docs/design.md section 4.8).

Every `MCConv2d` of an eval-only copy becomes the module of its planned form
(`passes.factored_forms.create_factored`), with the eval BatchNorm that alone consumes its
output folded in. The plan of each layer (`passes.planner.LayerPlan`: geometry, form, MACs,
weights held) comes from the planner for the PyTorch back end and the thread count the model
will run on, or (``compute="time"``) from timing dense and each factored form on the layer's
own input at that thread count. The whole `InferencePlan` is recorded in the copy's `MCNInfo`
(``info_of(model).plan``). Numbers only: nothing here prints.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mcn_compress.errors import ConfigError
from mcn_compress.info import update_info
from mcn_compress.module_utils import input_sizes, resolve_input_shape, set_submodule
from mcn_compress.nn.mcconv import MCConv2d
from mcn_compress.passes.factored_forms import create_factored
from mcn_compress.passes.fold_bn import conv_batchnorm_pairs, folding_factors
from mcn_compress.passes.planner import (
    Backend,
    Compute,
    Form,
    Geometry,
    InferencePlan,
    LayerPlan,
    candidates,
    default_threads,
    enum_value,
    layer_geometry,
    plan_layer,
)


def _time_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def optimize_for_inference(
    model: nn.Module,
    *,
    compute: Compute | str = Compute.AUTO,
    threads: int | None = None,
    input_size: int | Sequence[int] | None = None,
    batch: int = 1,
    repeats: int = 5,
) -> nn.Module:
    """An eval-only deep copy of ``model`` whose MCConv2d run factored (docs/design.md 4.8).

    Every MCConv2d becomes the module of its planned form; an eval BatchNorm that alone
    consumes its output is folded into it (exactly: scale into the combination, shift into the
    bias). ``compute``: ``"auto"`` (default) applies the planner's rule for PyTorch at
    ``threads``; ``"time"`` times dense and each factored form on the layer's input (``batch``
    x the shape met on one forward of an input of ``input_size``, median of ``repeats``, with
    ``threads`` torch threads) and keeps the fastest; ``"factored"`` forces the rule's factored
    form, ``"dense"`` the dense conv (with BatchNorm folded). ``threads``: the thread count the
    model will run with (default: this machine's cores). The `InferencePlan` is recorded as
    ``info_of(result).plan``; gradients are not supported.

    Raises:
        ConfigError: an unknown ``compute``, ``threads`` < 1 or a bad ``input_size``.
    """
    compute = enum_value(Compute, compute, "compute")
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
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
    for name in layer_names:
        layer = modules[name]
        assert isinstance(layer, MCConv2d)
        geo = layer_geometry(layer, sizes.get(name, (1, 1)))
        bn_name, scale, shift = None, None, None
        if name in pairs:
            bn_name, replacement = pairs[name]
            scale, shift = folding_factors(modules[bn_name])
        if compute is Compute.TIME:
            with _torch_threads(threads):
                plan = _timed_plan(name, layer, geo, scale, shift, batch, repeats, device)
            plan = LayerPlan(name, geo, plan.form, bn_name, plan.times_ms)
        else:
            plan = plan_layer(name, geo, compute, Backend.TORCH, threads, folded_batchnorm=bn_name)
        set_submodule(work, name, create_factored(layer, plan, scale, shift).to(device))
        if bn_name is not None:
            set_submodule(work, bn_name, replacement)
        rows.append(plan)
    update_info(work, plan=InferencePlan(Backend.TORCH, compute, threads, shape, tuple(rows)))
    return work


def _timed_plan(
    name: str,
    layer: MCConv2d,
    geo: Geometry,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    batch: int,
    repeats: int,
    device: torch.device,
) -> LayerPlan:
    """The plan whose form ran fastest on a random input of the layer's shape."""
    x = torch.randn(batch, layer.in_channels, *geo.input_hw, device=device)
    times = {}
    for form in [Form.DENSE, *candidates(geo)]:
        module = create_factored(layer, LayerPlan(name, geo, form), scale, shift).to(device)
        times[form.value] = _time_ms(module, x, repeats)
    best = min(times, key=lambda f: times[f])
    return LayerPlan(name, geo, Form(best), times_ms=times)


__all__ = ["optimize_for_inference"]
