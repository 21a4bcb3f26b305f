"""Tests of `MCConv2d` against naive references written from docs/design.md section 2.

Every expected value is computed here with explicit loops over filters h, planes j and input
channels c; the layer's own helpers are only ever the thing under test.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcn_compress.nn.mcconv import MCConv2d

DT = torch.float64


# --------------------------------------------------------------------------------------------
# naive references
# --------------------------------------------------------------------------------------------
def naive_sign(t: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, written elementwise-independently of the library."""
    return torch.sign(t) + (t == 0).to(t.dtype)


def naive_q(c: torch.Tensor, m: torch.Tensor, planes: int) -> torch.Tensor:
    """``Q[h*K + j, c] = sign(C[h, c]) * M[j]`` with explicit loops."""
    n_h, cin, kh, kw = c.shape
    q = torch.zeros(n_h * planes, cin, kh, kw, dtype=c.dtype)
    for h in range(n_h):
        for j in range(planes):
            for ch in range(cin):
                q[h * planes + j, ch] = naive_sign(c[h, ch]) * m[j]
    return q


def reference_forward(layer: MCConv2d, x: torch.Tensor) -> torch.Tensor:
    """conv2d with the naive Q built from the layer's current parameters."""
    q = naive_q(layer.weight.detach(), layer.mfilter.detach(), layer.planes)
    bias = None if layer.bias is None else layer.bias.detach()
    return F.conv2d(x, q, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def naive_filter_loss(c: torch.Tensor, m: torch.Tensor, planes: int) -> torch.Tensor:
    """``1/2 * sum_{h,c} ||C[h, c] - B[h, c] * M[c mod K]||^2`` with loops."""
    total = torch.zeros((), dtype=c.dtype)
    for h in range(c.shape[0]):
        for ch in range(c.shape[1]):
            diff = c[h, ch] - naive_sign(c[h, ch]) * m[ch % planes]
            total = total + 0.5 * (diff * diff).sum()
    return total


def naive_minimizer(c: torch.Tensor, planes: int, mcn1: bool) -> torch.Tensor:
    """``M[k] = mean over (h, g) of |C[h, g*K + k]|`` (and over positions for MCNs-1)."""
    n_h, cin, kh, kw = c.shape
    n_g = cin // planes
    m = torch.zeros(planes, kh, kw, dtype=c.dtype)
    for k in range(planes):
        acc = torch.zeros(kh, kw, dtype=c.dtype)
        for h in range(n_h):
            for g in range(n_g):
                acc = acc + c[h, g * planes + k].abs()
        m[k] = acc / (n_h * n_g)
    if mcn1:
        return torch.stack([m[k].mean() for k in range(planes)]).reshape(planes, 1, 1)
    return m


def closed_form_grads(
    layer: MCConv2d, x: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dC and dL/dM of ``L = sum(y * g)`` from the closed forms of docs/design.md section 2."""
    k_planes = layer.planes
    c = layer.weight.detach()
    m = layer.mfilter.detach()
    q = naive_q(c, m, k_planes).requires_grad_(True)
    bias = None if layer.bias is None else layer.bias.detach()
    y = F.conv2d(x, q, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    (dq,) = torch.autograd.grad((y * g).sum(), q)
    n_h, cin, kh, kw = c.shape
    dm = torch.zeros(k_planes, kh, kw, dtype=c.dtype)
    dc = torch.zeros_like(c)
    for h in range(n_h):
        for ch in range(cin):
            b = naive_sign(c[h, ch])
            acc = torch.zeros(m.shape[1:], dtype=c.dtype)
            for j in range(k_planes):
                dm[j] = dm[j] + dq[h * k_planes + j, ch] * b
                acc = acc + dq[h * k_planes + j, ch] * m[j]
            passes = (c[h, ch].abs() <= layer.clip).to(c.dtype)
            dc[h, ch] = acc * passes
    if layer.mcn1:
        dm = dm.sum(dim=(1, 2)).reshape(k_planes, 1, 1)
    return dc, dm


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    planes: int
    cin: int
    cout: int
    kernel: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] | str = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    bias: bool = True
    mcn1: bool = False
    clip: float = 1.0
    size: tuple[int, int] = (7, 6)

    def build(self) -> MCConv2d:
        return MCConv2d(
            self.cin,
            self.cout,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            planes=self.planes,
            mcn1=self.mcn1,
            clip=self.clip,
            dtype=DT,
        )


CASES = [
    Case(1, 3, 5, 3, padding=1),
    Case(1, 2, 3, (2, 3), stride=2, bias=False, mcn1=True),
    Case(2, 4, 6, (3, 2), stride=(2, 1), padding=(1, 0), bias=False),
    Case(2, 6, 4, 3, padding="same", mcn1=True),
    Case(4, 8, 8, 3, padding=2, dilation=2),
    Case(4, 4, 8, 3, stride=2, padding=1, mcn1=True, bias=False),
    Case(8, 16, 8, 1),
    Case(8, 8, 16, 2, dilation=(1, 2), mcn1=True),
    Case(2, 8, 12, 3, padding=1, groups=2),
    Case(4, 8, 8, 3, stride=2, padding=1, groups=2, bias=False, mcn1=True),
    Case(2, 8, 4, 3, padding=1, groups=2, clip=0.5),
]


def case_id(case: Case) -> str:
    return (
        f"K{case.planes}-{case.cin}x{case.cout}-k{case.kernel}-s{case.stride}-p{case.padding}"
        f"-d{case.dilation}-g{case.groups}-b{int(case.bias)}-mcn1{int(case.mcn1)}"
    )


def randomize(layer: MCConv2d, gen: torch.Generator, zeros: int = 3) -> None:
    """Random C of both signs (some |C| > 1, some exactly 0, some at +-clip) and random M."""
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=DT))
        flat = layer.weight.view(-1)
        idx = torch.randperm(flat.numel(), generator=gen)
        flat[idx[:zeros]] = 0.0
        flat[idx[zeros : zeros + 2]] = layer.clip
        flat[idx[zeros + 2 : zeros + 4]] = -layer.clip
        layer.mfilter.copy_(torch.randn(layer.mfilter.shape, generator=gen, dtype=DT))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen, dtype=DT))


def make_input(case: Case, gen: torch.Generator, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, case.cin, *case.size, generator=gen, dtype=DT)


# --------------------------------------------------------------------------------------------
# 1. forward values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_matches_naive_reference(case: Case, mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    layer = case.build().train(mode == "train")
    randomize(layer, gen)
    expected_mshape = (case.planes, 1, 1) if case.mcn1 else (case.planes, *_pair(case.kernel))
    assert tuple(layer.mfilter.shape) == expected_mshape
    assert tuple(layer.weight.shape) == (
        case.cout // case.planes,
        case.cin // case.groups,
        *_pair(case.kernel),
    )
    x = make_input(case, gen)
    y = layer(x)
    ref = reference_forward(layer, x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def test_sign_of_zero_is_plus_one_in_forward() -> None:
    layer = MCConv2d(3, 1, 1, bias=False, planes=1, dtype=DT)
    with torch.no_grad():
        layer.weight.zero_()
        layer.mfilter.fill_(2.0)
    y = layer(torch.ones(1, 3, 2, 2, dtype=DT))
    # sign(0) = +1: each of the 3 input channels contributes +2.
    torch.testing.assert_close(y, torch.full((1, 1, 2, 2), 6.0, dtype=DT))


def test_one_binary_filter_gives_k_modulated_output_channels() -> None:
    """Output channel h*K + j is the binary filter h modulated by plane j of M."""
    k_planes = 4
    layer = MCConv2d(4, 8, 1, bias=False, planes=k_planes, dtype=DT)
    with torch.no_grad():
        row = torch.tensor([1.0, -1.0, 0.0, -3.0], dtype=DT).reshape(1, 4, 1, 1)
        layer.weight.copy_(row.repeat(2, 1, 1, 1))
        layer.weight[1].mul_(-1)
        layer.mfilter.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1))
    x = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=DT).reshape(1, 4, 1, 1)
    y = layer(x).flatten()
    # filter 0 signs: (+1, -1, +1, -1) -> 1 - 10 + 100 - 1000 = -909
    # filter 1 signs: (-1, +1, +1 (sign of -0.0 is +1), +1) -> -1 + 10 + 100 + 1000 = 1109
    planes_m = (1.0, 2.0, 3.0, 4.0)
    expected = torch.tensor([-909.0 * m for m in planes_m] + [1109.0 * m for m in planes_m])
    torch.testing.assert_close(y, expected.to(DT))


# --------------------------------------------------------------------------------------------
# 2. gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_match_closed_forms(case: Case) -> None:
    gen = torch.Generator().manual_seed(2)
    layer = case.build()
    randomize(layer, gen)
    x = make_input(case, gen)
    g = torch.randn(reference_forward(layer, x).shape, generator=gen, dtype=DT)
    (layer(x) * g).sum().backward()
    dc, dm = closed_form_grads(layer, x, g)
    assert layer.weight.grad is not None and layer.mfilter.grad is not None
    torch.testing.assert_close(layer.weight.grad, dc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.mfilter.grad, dm, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("clip", [1.0, 0.25, 2.0])
def test_ste_clip_masks_exactly_outside_clip(clip: float) -> None:
    """Entries with |C| > clip get zero gradient, |C| <= clip (including 0 and +-clip) pass."""
    values = torch.tensor([0.0, clip, -clip, clip * 1.01, -clip * 1.5, clip * 0.5], dtype=DT)
    layer = MCConv2d(6, 2, 1, bias=False, planes=2, clip=clip, dtype=DT)
    with torch.no_grad():
        layer.weight.copy_(values.reshape(1, 6, 1, 1))
        layer.mfilter.copy_(torch.tensor([0.7, -1.3], dtype=DT).reshape(2, 1, 1))
    x = torch.ones(1, 6, 1, 1, dtype=DT)
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    grad = layer.weight.grad.flatten()
    # dL/dC = sum_j dL/dQ[j] * M[j] = 0.7 - 1.3 = -0.6 where the STE passes.
    expected = torch.tensor([-0.6, -0.6, -0.6, 0.0, 0.0, -0.6], dtype=DT)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 3. filter loss
# --------------------------------------------------------------------------------------------
FILTER_CASES = [
    Case(1, 3, 2, 3),
    Case(2, 4, 4, 3),
    Case(4, 8, 8, (3, 1)),
    Case(4, 8, 4, 3, mcn1=True),
    Case(2, 8, 4, 3, groups=2),
    Case(2, 8, 8, 2, groups=2, mcn1=True),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=case_id)
def test_filter_loss_value_and_gradients(case: Case) -> None:
    gen = torch.Generator().manual_seed(3)
    layer = case.build()
    randomize(layer, gen)
    k_planes = case.planes
    c = layer.weight.detach().clone()
    m = layer.mfilter.detach().clone()

    loss = layer.filter_loss()
    torch.testing.assert_close(loss, naive_filter_loss(c, m, k_planes), rtol=1e-12, atol=1e-12)
    loss.backward()

    n_h, cin = c.shape[:2]
    dc = torch.zeros_like(c)
    dm = torch.zeros(k_planes, *c.shape[2:], dtype=DT)
    for h in range(n_h):
        for ch in range(cin):
            b = naive_sign(c[h, ch])
            resid = c[h, ch] - b * m[ch % k_planes]
            dc[h, ch] = resid
            dm[ch % k_planes] = dm[ch % k_planes] - resid * b
    if case.mcn1:
        dm = dm.sum(dim=(1, 2)).reshape(k_planes, 1, 1)
    assert layer.weight.grad is not None and layer.mfilter.grad is not None
    torch.testing.assert_close(layer.weight.grad, dc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.mfilter.grad, dm, rtol=1e-10, atol=1e-10)


def test_filter_loss_uses_input_plane_of_m() -> None:
    """M is matched on the input plane c mod K: a swap of M's planes changes the loss."""
    layer = MCConv2d(2, 2, 1, bias=False, planes=2, dtype=DT)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -3.0], dtype=DT).reshape(1, 2, 1, 1))
        layer.mfilter.copy_(torch.tensor([1.0, 3.0], dtype=DT).reshape(2, 1, 1))
    assert float(layer.filter_loss().detach()) == pytest.approx(0.0, abs=1e-15)
    with torch.no_grad():
        layer.mfilter.copy_(torch.tensor([3.0, 1.0], dtype=DT).reshape(2, 1, 1))
    # 1/2 * ((1 - 3)^2 + (-3 + 1)^2) = 4
    assert float(layer.filter_loss().detach()) == pytest.approx(4.0, abs=1e-12)


# --------------------------------------------------------------------------------------------
# 4. closed-form minimiser of the filter loss
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FILTER_CASES, ids=case_id)
def test_closed_form_minimizer_is_the_argmin(case: Case) -> None:
    gen = torch.Generator().manual_seed(4)
    layer = case.build()
    randomize(layer, gen)
    c = layer.weight.detach().clone()
    m_star = naive_minimizer(c, case.planes, case.mcn1)
    assert m_star.shape == layer.mfilter.shape

    # The library's own minimiser and its initialisation agree with the loop.
    torch.testing.assert_close(layer.filter_loss_minimizer(), m_star, rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        layer.mfilter.copy_(m_star)
    layer.zero_grad()
    best = layer.filter_loss()
    best.backward()
    assert layer.mfilter.grad is not None
    torch.testing.assert_close(layer.mfilter.grad, torch.zeros_like(m_star), rtol=0.0, atol=1e-10)

    worse = 0
    for _ in range(8):
        direction = torch.randn(m_star.shape, generator=gen, dtype=DT)
        for eps in (1e-4, -1e-4, 1e-1, -1e-1):
            with torch.no_grad():
                layer.mfilter.copy_(m_star + eps * direction)
                perturbed = layer.filter_loss()
            assert float(perturbed) >= float(best.detach()) - 1e-12
            worse += int(float(perturbed) > float(best.detach()))
    assert worse > 0


def test_reset_parameters_sets_m_to_minimizer() -> None:
    torch.manual_seed(5)
    for mcn1 in (False, True):
        layer = MCConv2d(8, 8, 3, planes=4, mcn1=mcn1, dtype=DT)
        expected = naive_minimizer(layer.weight.detach(), 4, mcn1)
        torch.testing.assert_close(layer.mfilter.detach(), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 5. eval-mode caching
# --------------------------------------------------------------------------------------------
CACHE_CASE = Case(2, 4, 4, 3, padding=1)


def _eval_layer(seed: int = 6) -> tuple[MCConv2d, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layer = CACHE_CASE.build()
    randomize(layer, gen, zeros=0)
    return layer.eval(), make_input(CACHE_CASE, gen)


def test_eval_no_grad_forwards_are_identical_and_correct() -> None:
    layer, x = _eval_layer()
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, reference_forward(layer, x), rtol=1e-12, atol=1e-12)


def test_eval_cache_sees_in_place_weight_change() -> None:
    layer, x = _eval_layer()
    with torch.no_grad():
        old = layer(x)
        layer.weight.mul_(-1)
        new = layer(x)
    assert not torch.allclose(old, new)
    torch.testing.assert_close(new, reference_forward(layer, x), rtol=1e-12, atol=1e-12)


def test_eval_cache_sees_in_place_mfilter_change() -> None:
    layer, x = _eval_layer()
    with torch.no_grad():
        old = layer(x)
        layer.mfilter.mul_(2.5)
        new = layer(x)
    assert not torch.allclose(old, new)
    torch.testing.assert_close(new, reference_forward(layer, x), rtol=1e-12, atol=1e-12)


def test_eval_cache_after_edit_through_data_and_eval() -> None:
    """`p.data` edits bypass the version counter: the documented remedy is `.eval()` again."""
    layer, x = _eval_layer()
    with torch.no_grad():
        old = layer(x)
    layer.weight.data.mul_(-1)
    layer.eval()
    with torch.no_grad():
        new = layer(x)
    assert not torch.allclose(old, new)
    torch.testing.assert_close(new, reference_forward(layer, x), rtol=1e-12, atol=1e-12)


def test_eval_cache_sees_load_state_dict() -> None:
    layer, x = _eval_layer(6)
    other, _ = _eval_layer(7)
    with torch.no_grad():
        old = layer(x)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        new = layer(x)
    assert not torch.allclose(old, new)
    torch.testing.assert_close(new, reference_forward(other, x), rtol=1e-12, atol=1e-12)


def test_eval_cache_sees_parameter_replacement() -> None:
    layer, x = _eval_layer()
    with torch.no_grad():
        old = layer(x)
    layer.weight = nn.Parameter(-layer.weight.detach().clone())
    with torch.no_grad():
        new = layer(x)
    assert not torch.allclose(old, new)
    torch.testing.assert_close(new, reference_forward(layer, x), rtol=1e-12, atol=1e-12)


def test_eval_cache_after_train_step_then_eval() -> None:
    layer, x = _eval_layer()
    with torch.no_grad():
        old = layer(x)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).pow(2).mean().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        new = layer(x)
    assert not torch.allclose(old, new)
    torch.testing.assert_close(new, reference_forward(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "opt_kwargs",
    [{"foreach": False}, {"foreach": True}, {"fused": True}],
    ids=["for-loop", "foreach", "fused"],
)
def test_eval_cache_after_optimizer_step_in_eval_mode(opt_kwargs: dict[str, bool]) -> None:
    """Fine-tuning in eval mode (frozen BN), validating under no_grad between steps."""
    layer, x = _eval_layer()
    with torch.no_grad():
        old = layer(x)
    opt = torch.optim.Adam(layer.parameters(), lr=0.5, **opt_kwargs)
    layer(x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        new = layer(x)
    assert not torch.allclose(old, new)
    torch.testing.assert_close(new, reference_forward(layer, x), rtol=1e-12, atol=1e-12)


def test_eval_cache_under_inference_mode() -> None:
    layer, x = _eval_layer()
    with torch.inference_mode():
        y1 = layer(x)
        y2 = layer(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, reference_forward(layer, x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        layer.weight.mul_(-1)
    with torch.inference_mode():
        y3 = layer(x)
    torch.testing.assert_close(y3, reference_forward(layer, x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y1, y3)
    # A cache filled in inference mode must be usable afterwards in a normal forward.
    with torch.no_grad():
        y4 = layer(x)
    torch.testing.assert_close(y4, y3, rtol=0.0, atol=0.0)
    y5 = layer(x)
    y5.sum().backward()
    assert layer.weight.grad is not None


def test_eval_cache_follows_dtype_change() -> None:
    layer, x = _eval_layer()
    layer.float()
    with torch.no_grad():
        y32 = layer(x.float())
    assert y32.dtype == torch.float32
    layer.double()
    with torch.no_grad():
        layer.weight.mul_(-1)
        y64 = layer(x)
    assert y64.dtype == DT
    torch.testing.assert_close(y64, reference_forward(layer, x), rtol=1e-12, atol=1e-12)


def test_deepcopy_of_cached_layer_is_independent() -> None:
    layer, x = _eval_layer()
    with torch.no_grad():
        layer(x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.mul_(-1)
        y_twin = twin(x)
        y_layer = layer(x)
    torch.testing.assert_close(y_twin, reference_forward(twin, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_layer, reference_forward(layer, x), rtol=1e-12, atol=1e-12)


def test_train_eval_roundtrip_and_eval_gradients() -> None:
    layer, x = _eval_layer()
    with torch.no_grad():
        y_eval = layer(x)
    layer.train()
    y_train = layer(x)
    layer.eval()
    assert not layer.training
    torch.testing.assert_close(y_train.detach(), y_eval, rtol=1e-12, atol=1e-12)

    # Eval mode with grad enabled: gradients flow to both C and M, with the closed forms.
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(y_eval.shape, generator=gen, dtype=DT)
    layer.zero_grad()
    y = layer(x)
    assert y.requires_grad
    (y * g).sum().backward()
    dc, dm = closed_form_grads(layer, x, g)
    assert layer.weight.grad is not None and layer.mfilter.grad is not None
    assert layer.mfilter.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.weight.grad, dc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.mfilter.grad, dm, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# 6. conversions
# --------------------------------------------------------------------------------------------
CONV_CASES = [
    (nn.Conv2d(8, 8, 3, stride=2, padding=1), 4, False),
    (nn.Conv2d(8, 16, 3, padding=2, dilation=2, bias=False), 4, True),
    (nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0)), 2, False),
    (nn.Conv2d(6, 4, 3, padding="same"), 2, False),
    (nn.Conv2d(8, 8, 3, padding=1, groups=2), 2, False),
    (nn.Conv2d(8, 8, 1), 8, True),
    (nn.Conv2d(3, 5, 3), 1, False),
]


@pytest.mark.parametrize(
    ("conv", "planes", "mcn1"),
    CONV_CASES,
    ids=[f"case{i}" for i in range(len(CONV_CASES))],
)
def test_from_conv2d_and_to_conv2d(conv: nn.Conv2d, planes: int, mcn1: bool) -> None:
    torch.manual_seed(9)
    conv = copy.deepcopy(conv).to(DT)
    mod = MCConv2d.from_conv2d(conv, planes=planes, mcn1=mcn1)
    assert isinstance(mod, MCConv2d)
    assert mod.stride == conv.stride
    assert mod.padding == conv.padding
    assert mod.dilation == conv.dilation
    assert mod.groups == conv.groups
    assert mod.in_channels == conv.in_channels and mod.out_channels == conv.out_channels
    assert mod.planes == planes and mod.mcn1 == mcn1
    assert mod.weight.dtype == DT
    if conv.bias is None:
        assert mod.bias is None
    else:
        assert mod.bias is not None
        assert torch.equal(mod.bias.detach(), conv.bias.detach())

    x = torch.randn(2, conv.in_channels, 9, 8, dtype=DT)
    y = mod(x)
    ref = reference_forward(mod, x)
    assert y.shape == conv(x).shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)

    folded = mod.to_conv2d()
    assert isinstance(folded, nn.Conv2d)
    assert folded.stride == conv.stride and folded.padding == conv.padding
    assert folded.dilation == conv.dilation and folded.groups == conv.groups
    assert (folded.bias is None) == (conv.bias is None)
    torch.testing.assert_close(
        folded.weight.detach(),
        naive_q(mod.weight.detach(), mod.mfilter.detach(), planes),
        rtol=0.0,
        atol=0.0,
    )
    torch.testing.assert_close(folded(x), ref, rtol=1e-12, atol=1e-12)
    mod.eval()
    with torch.no_grad():
        torch.testing.assert_close(mod(x), folded(x), rtol=1e-12, atol=1e-12)


def test_to_conv2d_is_a_snapshot() -> None:
    layer, x = _eval_layer()
    folded = layer.to_conv2d()
    before = folded(x).detach()
    with torch.no_grad():
        layer.weight.mul_(-1)
    torch.testing.assert_close(folded(x).detach(), before, rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------------------------
# 7. constructor errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cin", "cout", "groups", "planes"),
    [
        (6, 8, 1, 4),  # in not divisible by K
        (8, 6, 1, 4),  # out not divisible by K
        (5, 5, 1, 2),  # neither
        (8, 8, 4, 4),  # divisible overall, per-group channels (2) are not
        (8, 16, 8, 2),  # depthwise-like: 1 input channel per group
        (8, 8, 3, 1),  # channels not divisible by groups
    ],
)
def test_constructor_rejects_indivisible_channels(
    cin: int, cout: int, groups: int, planes: int
) -> None:
    with pytest.raises(ValueError):
        MCConv2d(cin, cout, 3, groups=groups, planes=planes)


@pytest.mark.parametrize("planes", [0, -2])
def test_constructor_rejects_nonpositive_planes(planes: int) -> None:
    with pytest.raises(ValueError):
        MCConv2d(4, 4, 3, planes=planes)


def test_constructor_accepts_divisible_grouped_channels() -> None:
    layer = MCConv2d(8, 8, 3, groups=2, planes=4)
    assert tuple(layer.weight.shape) == (2, 4, 3, 3)
