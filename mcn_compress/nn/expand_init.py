"""Initialisation of expand-mode `MCConv2d` layers from pretrained filters (docs/design.md
section 2, "Initialisation")."""

from __future__ import annotations

import math

import torch

from mcn_compress.nn.sign import hard_sign

PLANE_SPREAD = 0.02
"""Relative spread of the K M-Filter planes at initialisation (planes ``1 -/+ PLANE_SPREAD/2``)."""


_SCALE_CANDIDATES = (0.75, 1.0, 1.5, 2.0, 3.0)  # initial level steps, in units of rms(W0) / K


_FIT_SAMPLE_ROWS = 16384  # filter rows (h, c) the level scale is searched on


def _levels(w: torch.Tensor, m: torch.Tensor, planes: int) -> torch.Tensor:
    """Nearest level of ``w / m`` among ``-K, -K+2, ..., K``."""
    count = torch.clamp(torch.round((w / m + planes) / 2), 0, planes)
    return 2 * count - planes


def _least_squares_scale(
    w: torch.Tensor, levels: torch.Tensor, dims: tuple[int, ...], fallback: torch.Tensor
) -> torch.Tensor:
    den = levels.pow(2).sum(dim=dims, keepdim=True)
    num = (w * levels).sum(dim=dims, keepdim=True)
    return torch.where(den > 0, num / den.clamp_min(1e-30), fallback)


def plane_factors(
    planes: int, kernel_size: tuple[int, int] = (1, 1), spread: float = PLANE_SPREAD
) -> torch.Tensor:
    """Multipliers of the K M-Filter planes at init, shape ``(K, kh, kw)``.

    At kernel position p plane j gets ``1 + spread * (((j + p) mod K) / (K - 1) - 1/2)``: the
    planes' factors are evenly spaced around 1 with mean exactly 1 at every position, and the
    order rotates with the position, so the planes differ in shape, not only in scale (a
    common scale per plane would be undone by the next BatchNorm in training mode).
    """
    kh, kw = kernel_size
    if planes == 1:
        return torch.ones(1, kh, kw, dtype=torch.float64)
    position = torch.arange(kh * kw).view(1, kh, kw)
    order = (torch.arange(planes).view(planes, 1, 1) + position) % planes
    return 1 + spread * (order.to(torch.float64) / (planes - 1) - 0.5)


def fit_expanded(
    w0: torch.Tensor,
    planes: int,
    mcn1: bool = False,
    iters: int = 10,
    spread: float = PLANE_SPREAD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent C and M-Filter of an expand-mode `MCConv2d` approximating ``w0``.

    ``w0`` is the float weight ``(out, in // groups, kh, kw)``; the result is C of shape
    ``(out, in // groups * K, kh, kw)`` and M of shape ``(K, kh, kw)`` (``(K, 1, 1)`` for
    MCNs-1). On K equal input planes, output plane j uses ``M[j] * S`` with ``S[h, c] =
    sum_k sign(C[h, c*K + k])``, a (K+1)-level quantization of W0: the level scale m and the
    levels are fitted by alternating closed-form steps (levels given m: nearest level; m given
    levels: least squares), ``iters`` steps from each of a few starting scales on at most
    16384 sampled rows ``(h, c)``, keeping the best; the final M is the least-squares optimum
    on all of W0. Plane k of map c is
    +1 where W0 / m exceeds a threshold whose rank rotates with ``h + c``, so every level
    is reached with varied sign patterns; C keeps W0's ordering (its distance to the threshold)
    and is rescaled per input plane so that ``mean |C| = M``, the filter-loss minimiser
    (docs/design.md section 2). M is the least-squares optimum for the signs, times
    `plane_factors` so that the K planes are never copies of one another.
    """
    compute = torch.float64 if w0.dtype == torch.float64 else torch.float32
    w = w0.detach().to(compute)
    out, cin, kh, kw = w.shape
    dims = (0, 1, 2, 3) if mcn1 else (0, 1)
    tiny = torch.finfo(compute).tiny
    # The scale depends only on the distribution of W0: search it on a strided sample of rows.
    rows = w.reshape(out * cin, 1, kh, kw)
    sample = rows[:: max(1, math.ceil(rows.shape[0] / _FIT_SAMPLE_ROWS))]
    rms = sample.pow(2).mean(dim=dims, keepdim=True).sqrt()
    best: tuple[float, torch.Tensor] | None = None
    for factor in _SCALE_CANDIDATES:
        m = (factor * rms / planes).clamp_min(tiny)
        for _ in range(iters):
            m = _least_squares_scale(sample, _levels(sample, m, planes), dims, m).clamp_min(tiny)
        err = float((sample - m * _levels(sample, m, planes)).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, m)
    assert best is not None
    m = best[1]
    # Thresholds: plane k of (h, c) is +1 iff (W0/m + K)/2 > rank + 1/2; ranks rotate with h + c.
    count = ((w / m + planes) / 2).unsqueeze(2)  # (out, cin, 1, kh, kw)
    offset = torch.arange(out).view(out, 1) + torch.arange(cin).view(1, cin)
    rank = (offset.view(out, cin, 1) + torch.arange(planes).view(1, 1, planes)) % planes
    raw = count - (rank.to(compute) + 0.5).view(out, cin, planes, 1, 1)  # (out, cin, K, kh, kw)
    signs = hard_sign(raw)
    levels = signs.sum(dim=2)
    m = _least_squares_scale(w, levels, dims, m).abs()
    factors = plane_factors(planes, (m.shape[2], m.shape[3]), spread).to(compute)
    mfilter = m.reshape(1, m.shape[2], m.shape[3]) * factors
    plane_dims = (0, 1, 3, 4) if mcn1 else (0, 1)
    scale_den = raw.abs().mean(dim=plane_dims, keepdim=True)
    target = mfilter.unsqueeze(0).unsqueeze(0)  # (1, 1, K, kh|1, kw|1)
    latent = torch.where(
        scale_den > 0, raw * (target / scale_den.clamp_min(tiny)), signs * target
    ).reshape(out, cin * planes, kh, kw)
    return latent.to(w0.dtype), mfilter.to(w0.dtype)


def expanded_error(w0: torch.Tensor, q: torch.Tensor, planes: int) -> float:
    """``sqrt(mean_j ||W0 - W_j||^2) / ||W0||``: the widened filters Q on K equal input planes.

    ``W_j[h, c] = sum_k Q[h*K + j, c*K + k]`` is what output plane j applies to map c when its
    K input planes are equal (the replicated input): the expand-mode counterpart of the
    per-layer ``||W0 - Q|| / ||W0||`` of width keep (docs/design.md section 2).
    """
    out, cin, kh, kw = w0.shape
    w = w0.detach()
    norm = torch.linalg.vector_norm(w, dtype=torch.float64)
    if norm == 0:
        return 0.0
    per_plane = q.detach().to(w.dtype).reshape(out, planes, cin, planes, kh, kw).sum(dim=3)
    diff = torch.linalg.vector_norm(per_plane - w.unsqueeze(1), dtype=torch.float64)
    return float(diff / math.sqrt(planes) / norm)
