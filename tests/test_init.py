"""Tests of the M-Filter initialisation (docs/design.md section 2, "Initialisation").

The references below are written naively with loops over filters h, planes j and input
channels c; the library's fitting helpers are only ever the thing under test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcn_compress.nn.init import fit_binary_approximation, latent_from_fit
from mcn_compress.nn.mcconv import MCConv2d

DT = torch.float64


# --------------------------------------------------------------------------------------------
# naive references
# --------------------------------------------------------------------------------------------
def naive_sign(t: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1."""
    return torch.sign(t) + (t == 0).to(t.dtype)


def naive_q(signs: torch.Tensor, m: torch.Tensor, planes: int) -> torch.Tensor:
    """``Q[h*K + j, c] = B[h, c] * M[j]`` with explicit loops."""
    n_h, cin, kh, kw = signs.shape
    q = torch.zeros(n_h * planes, cin, kh, kw, dtype=signs.dtype)
    for h in range(n_h):
        for j in range(planes):
            for c in range(cin):
                q[h * planes + j, c] = signs[h, c] * m[j]
    return q


def sq_error(w0: torch.Tensor, signs: torch.Tensor, m: torch.Tensor, planes: int) -> float:
    """``||W0 - Q||^2`` with the naive Q."""
    return float((w0 - naive_q(signs, m, planes)).pow(2).sum())


def closed_form_m(w0: torch.Tensor, signs: torch.Tensor, planes: int, mcn1: bool) -> torch.Tensor:
    """``M[j] = mean over (h, c) of W0[h*K + j, c] * B[h, c]`` (and over positions for MCNs-1)."""
    n_h, cin, kh, kw = signs.shape
    m = torch.zeros(planes, kh, kw, dtype=w0.dtype)
    for j in range(planes):
        acc = torch.zeros(kh, kw, dtype=w0.dtype)
        for h in range(n_h):
            for c in range(cin):
                acc = acc + w0[h * planes + j, c] * signs[h, c]
        m[j] = acc / (n_h * cin)
    if mcn1:
        return torch.stack([m[j].mean() for j in range(planes)]).reshape(planes, 1, 1)
    return m


def naive_baseline(w0: torch.Tensor, planes: int, mcn1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """B = sign of the plane-0 rows of W0, M = per-plane mean of |W0| (no fitting at all)."""
    n_out, cin, kh, kw = w0.shape
    n_h = n_out // planes
    signs = torch.zeros(n_h, cin, kh, kw, dtype=w0.dtype)
    for h in range(n_h):
        for c in range(cin):
            signs[h, c] = naive_sign(w0[h * planes, c])
    m = torch.zeros(planes, kh, kw, dtype=w0.dtype)
    for j in range(planes):
        acc = torch.zeros(kh, kw, dtype=w0.dtype)
        for h in range(n_h):
            for c in range(cin):
                acc = acc + w0[h * planes + j, c].abs()
        m[j] = acc / (n_h * cin)
    if mcn1:
        m = torch.stack([m[j].mean() for j in range(planes)]).reshape(planes, 1, 1)
    return signs, m


def make_weight(
    kind: str, n_h: int, planes: int, cin: int, kernel: tuple[int, int], seed: int
) -> torch.Tensor:
    """``random``: i.i.d. normal. ``structured``: the K rows of each filter share a pattern
    modulated per plane (some planes anti-correlated, so M can be negative), plus noise."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    if kind == "random":
        return torch.randn(n_h * planes, cin, kh, kw, generator=gen, dtype=DT)
    base = torch.randn(n_h, cin, kh, kw, generator=gen, dtype=DT)
    scale = torch.randn(planes, kh, kw, generator=gen, dtype=DT)
    w = torch.zeros(n_h * planes, cin, kh, kw, dtype=DT)
    for h in range(n_h):
        for j in range(planes):
            w[h * planes + j] = base[h] * scale[j]
    return w + 0.3 * torch.randn(w.shape, generator=gen, dtype=DT)


FIT_CASES = [
    (1, 4, 3, (3, 3)),
    (2, 3, 4, (3, 3)),
    (4, 2, 4, (3, 2)),
    (4, 3, 8, (1, 1)),
    (8, 1, 8, (2, 2)),
]


def fit_id(case: tuple[int, int, int, tuple[int, int]]) -> str:
    planes, n_h, cin, kernel = case
    return f"K{planes}-H{n_h}-C{cin}-k{kernel[0]}x{kernel[1]}"


# --------------------------------------------------------------------------------------------
# 1. M is the least-squares optimum for the returned signs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FIT_CASES, ids=fit_id)
@pytest.mark.parametrize("mcn1", [False, True], ids=["mcn", "mcn1"])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_m_is_least_squares_optimal_for_signs(
    case: tuple[int, int, int, tuple[int, int]], mcn1: bool, kind: str
) -> None:
    planes, n_h, cin, kernel = case
    w0 = make_weight(kind, n_h, planes, cin, kernel, seed=11)
    signs, m = fit_binary_approximation(w0, planes, mcn1=mcn1, iters=10)

    assert signs.shape == (n_h, cin, *kernel)
    assert m.shape == ((planes, 1, 1) if mcn1 else (planes, *kernel))
    assert signs.dtype == DT and m.dtype == DT
    assert bool(((signs == 1) | (signs == -1)).all())

    torch.testing.assert_close(m, closed_form_m(w0, signs, planes, mcn1), rtol=1e-10, atol=1e-12)

    best = sq_error(w0, signs, m, planes)
    gen = torch.Generator().manual_seed(12)
    raised = 0
    for _ in range(6):
        direction = torch.randn(m.shape, generator=gen, dtype=DT)
        for eps in (1e-4, -1e-4, 1e-1, -1e-1):
            err = sq_error(w0, signs, m + eps * direction, planes)
            assert err >= best - 1e-10 * max(best, 1.0)
            raised += int(err > best)
    assert raised > 0


# --------------------------------------------------------------------------------------------
# 2. the signs are optimal given M (at convergence of the alternation)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FIT_CASES[:4], ids=fit_id)
@pytest.mark.parametrize("mcn1", [False, True], ids=["mcn", "mcn1"])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_every_sign_flip_does_not_lower_error(
    case: tuple[int, int, int, tuple[int, int]], mcn1: bool, kind: str
) -> None:
    planes, n_h, cin, kernel = case
    w0 = make_weight(kind, n_h, planes, cin, kernel, seed=21)
    # Run the alternation to its fixed point (no relative-energy early stop).
    signs, m = fit_binary_approximation(w0, planes, mcn1=mcn1, iters=1000, tol=0.0)
    best = sq_error(w0, signs, m, planes)
    flat = signs.reshape(-1)
    for idx in range(flat.numel()):  # exhaustive: every (h, c, position)
        flipped = flat.clone()
        flipped[idx] = -flipped[idx]
        err = sq_error(w0, flipped.view_as(signs), m, planes)
        assert err >= best - 1e-10 * max(best, 1.0), f"flipping sign {idx} lowers the error"


# --------------------------------------------------------------------------------------------
# 3. latent_from_fit
# --------------------------------------------------------------------------------------------
def check_latent(
    latent: torch.Tensor, signs: torch.Tensor, m: torch.Tensor, planes: int, mcn1: bool
) -> None:
    assert latent.shape == signs.shape
    assert torch.equal(naive_sign(latent), signs)
    n_h, cin, kh, kw = latent.shape
    n_g = cin // planes
    for k in range(planes):
        acc = torch.zeros(kh, kw, dtype=latent.dtype)
        for h in range(n_h):
            for g in range(n_g):
                acc = acc + latent[h, g * planes + k].abs()
        mean = acc / (n_h * n_g)
        if mcn1:
            torch.testing.assert_close(mean.mean(), m[k].abs().reshape(()), rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(mean, m[k].abs(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", FIT_CASES, ids=fit_id)
@pytest.mark.parametrize("mcn1", [False, True], ids=["mcn", "mcn1"])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_latent_has_fitted_signs_and_minimiser_abs_m(
    case: tuple[int, int, int, tuple[int, int]], mcn1: bool, kind: str
) -> None:
    planes, n_h, cin, kernel = case
    w0 = make_weight(kind, n_h, planes, cin, kernel, seed=31)
    signs, m = fit_binary_approximation(w0, planes, mcn1=mcn1)
    latent = latent_from_fit(w0, signs, m, mcn1=mcn1)
    assert latent.dtype == DT
    check_latent(latent, signs, m, planes, mcn1)


def test_latent_with_negative_m_plane() -> None:
    """Anti-correlated planes give a negative M plane; the latent must still match |M|."""
    planes, n_h, cin = 2, 3, 4
    gen = torch.Generator().manual_seed(32)
    base = torch.randn(n_h, cin, 3, 3, generator=gen, dtype=DT)
    w0 = torch.zeros(n_h * planes, cin, 3, 3, dtype=DT)
    for h in range(n_h):
        w0[h * planes] = base[h]
        w0[h * planes + 1] = -0.5 * base[h]
    signs, m = fit_binary_approximation(w0, planes)
    assert bool((m[1] < 0).all())
    latent = latent_from_fit(w0, signs, m)
    check_latent(latent, signs, m, planes, mcn1=False)


@pytest.mark.parametrize("mcn1", [False, True], ids=["mcn", "mcn1"])
def test_latent_with_all_zero_input_plane(mcn1: bool) -> None:
    """Degenerate W0: every input channel of plane 1 is zero, but M[1] (an *output* plane) is
    not. The contract `mean |C[h, g*K + 1]| == |M[1]|` must still hold (e.g. C = B * |M[1]|)."""
    planes, n_h, cin = 2, 2, 4
    w0 = make_weight("random", n_h, planes, cin, (3, 3), seed=33)
    for c in range(1, cin, planes):
        w0[:, c] = 0.0
    signs, m = fit_binary_approximation(w0, planes, mcn1=mcn1)
    assert bool((m[1].abs() > 0).all())
    latent = latent_from_fit(w0, signs, m, mcn1=mcn1)
    check_latent(latent, signs, m, planes, mcn1)


def test_latent_float32_keeps_dtype_and_contract() -> None:
    planes, n_h, cin = 4, 4, 8
    w0 = make_weight("structured", n_h, planes, cin, (3, 3), seed=34).float()
    signs, m = fit_binary_approximation(w0, planes)
    assert signs.dtype == torch.float32 and m.dtype == torch.float32
    latent = latent_from_fit(w0, signs, m)
    assert latent.dtype == torch.float32
    assert torch.equal(naive_sign(latent), signs)
    n_g = cin // planes
    for k in range(planes):
        acc = torch.zeros(3, 3, dtype=DT)
        for h in range(n_h):
            for g in range(n_g):
                acc = acc + latent[h, g * planes + k].double().abs()
        torch.testing.assert_close(acc / (n_h * n_g), m[k].double().abs(), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# 4. never worse than the naive baseline; K = 1 is the BWN closed form
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FIT_CASES, ids=fit_id)
@pytest.mark.parametrize("mcn1", [False, True], ids=["mcn", "mcn1"])
@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("iters", [1, 10])
def test_fit_not_worse_than_naive_baseline(
    case: tuple[int, int, int, tuple[int, int]], mcn1: bool, kind: str, iters: int
) -> None:
    planes, n_h, cin, kernel = case
    w0 = make_weight(kind, n_h, planes, cin, kernel, seed=41)
    signs, m = fit_binary_approximation(w0, planes, mcn1=mcn1, iters=iters)
    b0, m0 = naive_baseline(w0, planes, mcn1)
    assert sq_error(w0, signs, m, planes) <= sq_error(w0, b0, m0, planes) * (1 + 1e-12)


@pytest.mark.parametrize("mcn1", [False, True], ids=["mcn", "mcn1"])
def test_k1_is_binary_weight_network_closed_form(mcn1: bool) -> None:
    n_out, cin, kh, kw = 5, 3, 3, 2
    w0 = make_weight("random", n_out, 1, cin, (kh, kw), seed=42)
    signs, m = fit_binary_approximation(w0, 1, mcn1=mcn1)
    expected_signs = torch.zeros(n_out, cin, kh, kw, dtype=DT)
    acc = torch.zeros(kh, kw, dtype=DT)
    for h in range(n_out):
        for c in range(cin):
            expected_signs[h, c] = naive_sign(w0[h, c])
            acc = acc + w0[h, c].abs()
    expected_m = acc / (n_out * cin)  # alpha = mean |W0|, elementwise over positions
    if mcn1:
        expected_m = expected_m.mean().reshape(1, 1)
    assert torch.equal(signs, expected_signs)
    torch.testing.assert_close(m, expected_m.unsqueeze(0), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 5. MCConv2d.from_conv2d on real convs
# --------------------------------------------------------------------------------------------
def relative_error(w0: torch.Tensor, signs: torch.Tensor, m: torch.Tensor, planes: int) -> float:
    return sq_error(w0, signs, m, planes) ** 0.5 / float(w0.pow(2).sum()) ** 0.5


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "planes", "mcn1", "kind", "dtype"),
    [
        (16, 32, 3, 4, False, "default", torch.float32),
        (16, 32, 3, 4, True, "default", torch.float32),
        (8, 8, 3, 2, False, "structured", DT),
        (8, 16, 1, 8, False, "default", DT),
        (12, 12, (3, 1), 4, True, "structured", torch.float32),
    ],
)
def test_from_conv2d_relative_error_not_worse_than_baseline(
    cin: int,
    cout: int,
    kernel: int | tuple[int, int],
    planes: int,
    mcn1: bool,
    kind: str,
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(51)
    conv = nn.Conv2d(cin, cout, kernel, padding=1).to(dtype)
    if kind == "structured":
        kh, kw = conv.kernel_size
        w = make_weight("structured", cout // planes, planes, cin, (kh, kw), seed=52)
        with torch.no_grad():
            conv.weight.copy_(w.to(dtype))
    w0 = conv.weight.detach().double()
    mod = MCConv2d.from_conv2d(conv, planes=planes, mcn1=mcn1)
    signs = naive_sign(mod.weight.detach().double())
    m = mod.mfilter.detach().double()

    err = relative_error(w0, signs, m, planes)
    b0, m0 = naive_baseline(w0, planes, mcn1)
    base = relative_error(w0, b0, m0, planes)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert 0.0 < err <= base * (1 + tol)
    # And the layer's M is the least-squares M for the layer's own signs.
    torch.testing.assert_close(
        m,
        closed_form_m(w0, signs, planes, mcn1),
        rtol=1e-5 if dtype == torch.float32 else 1e-10,
        atol=1e-7 if dtype == torch.float32 else 1e-12,
    )
