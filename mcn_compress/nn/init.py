"""M-Filter initialisation from pretrained filters (docs/design.md section 2, "Initialisation").

Given a pretrained weight ``W0`` of shape ``(H*K, Cin, kh, kw)`` we choose binary filters
``B`` (``H x Cin x kh x kw``) and an M-Filter ``M`` (``K x kh x kw``, or ``K x 1 x 1`` for
MCNs-1) minimising ``||W0 - Q||^2`` with ``Q[h*K + j, c] = B[h, c] * M[j]``. Both alternating
steps are closed form because the objective separates over kernel positions:

- signs given M:  ``B[h, c] = sign(sum_j W0[h*K + j, c] * M[j])``
- M given signs:  ``M[j] = mean over (h, c) of W0[h*K + j, c] * B[h, c]``  (``B^2 = 1``)
"""

from __future__ import annotations

import torch

from mcn_compress.nn.sign import hard_sign


def _plane_mean(x: torch.Tensor, mcn1: bool) -> torch.Tensor:
    """Mean of ``x`` (``H x K x Cin x kh x kw``) over h and c, and over positions for MCNs-1."""
    per_plane = x.sum(dim=0)  # reducing the leading dim first is much faster on CPU
    dims = (1, 2, 3) if mcn1 else (1,)
    mean = per_plane.mean(dim=dims) / x.shape[0]
    return mean.view(-1, 1, 1) if mcn1 else mean


def fit_binary_approximation(
    w0: torch.Tensor, planes: int, mcn1: bool = False, iters: int = 10, tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares binary approximation of ``w0`` by alternating closed-form steps.

    Returns ``(B, M)``: signs of shape ``(H, Cin, kh, kw)`` in {-1, +1} and the M-Filter of
    shape ``(K, kh, kw)`` (``(K, 1, 1)`` for MCNs-1). The last step is an M step, so ``M`` is
    the exact least-squares optimum for the returned signs. With M optimal for B the residual
    is ``||W0||^2 - H*Cin * sum(M^2)`` (per position), so the loop stops once ``sum(M^2)``
    grows by less than ``tol`` (relative) or the signs stop changing.
    """
    out_channels, cin, kh, kw = w0.shape
    if out_channels % planes:
        raise ValueError(f"out_channels {out_channels} is not divisible by planes {planes}")
    compute_dtype = torch.float64 if w0.dtype == torch.float64 else torch.float32
    w = w0.detach().to(compute_dtype).reshape(out_channels // planes, planes, cin, kh, kw)
    m = _plane_mean(w.abs(), mcn1)
    signs: torch.Tensor | None = None
    energy = 0.0
    for _ in range(iters):
        new_signs = hard_sign((w * m.unsqueeze(1)).sum(dim=1))
        if signs is not None and torch.equal(new_signs, signs):
            break
        signs = new_signs
        m = _plane_mean(w * signs.unsqueeze(1), mcn1)
        new_energy = float(m.pow(2).sum())
        if new_energy - energy <= tol * abs(new_energy):
            break
        energy = new_energy
    assert signs is not None
    return signs.to(w0.dtype), m.to(w0.dtype)


def latent_from_fit(
    w0: torch.Tensor, signs: torch.Tensor, mfilter: torch.Tensor, mcn1: bool = False
) -> torch.Tensor:
    """Latent filters C with ``sign(C) == signs`` and the filter-loss minimiser equal to ``|M|``.

    C keeps the pretrained ordering of magnitudes: it is the projection
    ``P[h, c] = sum_j W0[h*K + j, c] * M[j]`` (whose sign is ``signs`` by construction), rescaled
    per input plane ``k = c mod K`` so that ``mean over (h, g) of |C[h, g*K + k]| = |M[k]|``,
    the closed-form minimiser of the filter loss (docs/design.md section 2).
    """
    planes = mfilter.shape[0]
    h, cin, kh, kw = signs.shape
    compute_dtype = torch.float64 if w0.dtype == torch.float64 else torch.float32
    w = w0.detach().to(compute_dtype).reshape(h, planes, cin, kh, kw)
    m = mfilter.to(compute_dtype)
    proj = (w * m.unsqueeze(1)).sum(dim=1).abs() * signs.to(compute_dtype)
    # Group input channels by plane: channel c = g*K + k.
    grouped = proj.reshape(h, cin // planes, planes, kh, kw)
    dims = (0, 1, 3, 4) if mcn1 else (0, 1)
    scale_den = grouped.abs().mean(dim=dims, keepdim=True)
    target = m.abs().reshape(1, 1, planes, m.shape[1], m.shape[2])
    scaled = grouped * (target / scale_den.clamp_min(torch.finfo(compute_dtype).tiny))
    # Where a whole input plane projects to zero, fall back to sign * |M| (keeps the contract).
    flat = signs.to(compute_dtype).reshape(grouped.shape) * target
    latent = torch.where(scale_den > 0, scaled, flat).reshape(h, cin, kh, kw)
    return latent.to(w0.dtype)


def relative_error(w0: torch.Tensor, q: torch.Tensor) -> float | None:
    """``||W0 - Q|| / ||W0||`` (docs/design.md section 2), in float64; None when ``W0`` is zero."""
    norm = torch.linalg.vector_norm(w0.detach().double())
    if norm == 0:
        return None
    return float(torch.linalg.vector_norm(w0.detach().double() - q.detach().double()) / norm)
