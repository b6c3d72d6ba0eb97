"""Fit a conv's separable factors at the output of the depthwise conv that follows it (numpy only).

When a conv's output reaches a depthwise conv (one filter per channel) through per-channel affine ops only,
with no nonlinearity between, the two are one linear map. Output channel ``o`` of the depthwise conv reads
input channel ``c`` through the composed kernel ``h_o ⋆ W[o, c]``: a larger kernel (``span₁ + s₁·(span₂ − 1)``
taps per axis) at the product of the strides. The error that reaches the next nonlinearity is the depthwise
conv's output error, which weighs each channel by its filter's gain (filters of one model differ by 30× and
more) and each spatial frequency by the filter's response. Fitting the conv's own output weighs every channel
the same, so it can spend the rank on channels the model then nearly discards.

Here the conv's rank-``r`` factors (depthwise ``d_{c,j}``, pointwise ``p[o, c, j]``, bias ``β``) are fitted so
that, with ``E_o`` the linear map from a ``K``-tap filter to its composition with channel ``o``'s filter,

    t̂_o = Σ_{c,j} p[o, c, j] · (E_o d_{c,j})ᵀ x_c + σ_o·β_o + κ_o

matches the depthwise conv's original output ``t_o`` on calibration patches ``x`` of the composed kernel.
``σ_o = Σ h_o`` is how a constant in the conv's output reaches ``t_o``; ``κ_o`` collects the constants after
the conv (the depthwise bias, affine shifts through ``h_o``). The same streamed moments as the plain fit
(``lowrank.RegressionStats`` of the composed patches against ``t``) serve alternating least squares: the
pointwise weights and bias per output channel, then all depthwise filters jointly. Each step is an exact
least-squares solve, so the error never rises. Positions where the depthwise conv reads its zero padding do
not follow the composed kernel; they are left out of the statistics (``interior_positions``).

Group 1 only; the caller keeps the plain fit for grouped convs and for problems over ``MAX_WORK``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np

from .geometry import ConvGeometry
from .lowrank import (
    FittedFactors,
    RegressionStats,
    SeparableFactors,
    channel_spectra,
    factorize,
    regression_error,
    relative_ridge,
)

# Multiply-adds of one alternating round above which the composed fit is not attempted (8e8 took 0.2 s for a
# whole fit, so this bounds a fit to seconds).
MAX_WORK = 4e9
ROUNDS = 40
TOLERANCE = 1e-7  # stop when a round lowers the error by less than this share


def composed_taps(first: ConvGeometry, second: ConvGeometry) -> tuple[int, ...]:
    """Kernel shape of the composition: ``span₁ + s₁·(span₂ − 1)`` per axis."""
    return tuple(first.span(i) + first.strides[i] * (second.span(i) - 1) for i in range(first.dims))


def composed_geometry(
    first: ConvGeometry, second: ConvGeometry, x_spatial: Sequence[int]
) -> tuple[ConvGeometry, list[int], list[int]]:
    """The composed conv's geometry on inputs of ``x_spatial``, with the two outputs' spatial dims ``(y, z)``.

    Position ``i`` of the second conv reads input index ``i·s₁s₂ + u − (p₁ + s₁p₂)`` through tap ``u``. The end
    pads are generous: only interior positions are ever read, and they stay inside the first conv's padding.
    """
    d = first.dims
    pads1 = first.explicit_pads(x_spatial)
    y = [int(v) for v in first.output_spatial(x_spatial)]
    pads2 = second.explicit_pads(y)
    z = [int(v) for v in second.output_spatial(y)]
    kernel = composed_taps(first, second)
    begins = [pads1[i] + first.strides[i] * pads2[i] for i in range(d)]
    ends = [pads1[i + d] + first.strides[i] * pads2[i + d] + kernel[i] for i in range(d)]
    strides = tuple(first.strides[i] * second.strides[i] for i in range(d))
    return ConvGeometry(kernel, strides, tuple(begins + ends), (1,) * d), y, z


def interior_positions(second: ConvGeometry, y_spatial: Sequence[int], z_spatial: Sequence[int], batch: int) -> np.ndarray:
    """Flat indices over ``(batch, *z_spatial)`` of the second conv's outputs that read no padding."""
    d = second.dims
    pads = second.explicit_pads(y_spatial)
    masks = []
    for i in range(d):
        start = np.arange(z_spatial[i]) * second.strides[i] - pads[i]
        masks.append((start >= 0) & (start + second.span(i) - 1 <= y_spatial[i] - 1))
    inside = masks[0]
    for mask in masks[1:]:
        inside = np.logical_and.outer(inside, mask)
    per_sample = np.flatnonzero(inside.reshape(-1))
    size = math.prod(z_spatial)
    return (np.arange(batch)[:, None] * size + per_sample[None, :]).reshape(-1)


def to_composed_positions(positions: np.ndarray, z_spatial: Sequence[int], composed_spatial: Sequence[int]) -> np.ndarray:
    """Flat indices over ``(B, *z_spatial)`` re-expressed over the composed conv's (larger) output grid."""
    batch, flat = np.divmod(np.asarray(positions), math.prod(z_spatial))
    coords = np.unravel_index(flat, tuple(z_spatial))
    if any(np.any(c >= n) for c, n in zip(coords, composed_spatial)):
        raise ValueError("composed output grid smaller than the depthwise conv's")
    return batch * math.prod(composed_spatial) + np.ravel_multi_index(coords, tuple(composed_spatial))


def composition_operator(
    first: ConvGeometry, kernel_shape: tuple[int, ...], second: ConvGeometry, filters: np.ndarray
) -> np.ndarray:
    """``E (N, Kc, K)``: ``E[o] @ w`` is the composed kernel (flattened) of a ``K``-tap filter ``w`` then channel
    ``o``'s filter of ``filters (N, *k₂)``, tap ``u = d₁·a + s₁·d₂·b`` per axis."""
    n = filters.shape[0]
    taps = composed_taps(first, second)
    operator = np.zeros((n, math.prod(taps), math.prod(kernel_shape)))
    flat_filters = np.asarray(filters, dtype=np.float64).reshape(n, -1)
    for a_index, a in enumerate(np.ndindex(*kernel_shape)):
        for b_index, b in enumerate(np.ndindex(*filters.shape[1:])):
            u = tuple(first.dilations[i] * a[i] + first.strides[i] * second.dilations[i] * b[i] for i in range(first.dims))
            operator[:, np.ravel_multi_index(u, taps), a_index] += flat_filters[:, b_index]
    return operator


def work(in_channels: int, out_channels: int, taps: int, composed: int, rank: int) -> float:
    """Multiply-adds of one alternating round (both steps), for the ``MAX_WORK`` cap."""
    f = in_channels * composed + 1
    return out_channels * f * f * (in_channels * rank * (taps + 1) + 1)


def composed_weights(
    depthwise: np.ndarray, pointwise: np.ndarray, bias: np.ndarray, operator: np.ndarray, gain: np.ndarray, offset: np.ndarray
) -> np.ndarray:
    """Dense composed weights ``(1, N, F+1)`` (composed kernel per input channel, then the constant)."""
    n = pointwise.shape[0]
    composed = np.einsum("ocj,ouk,cjk->ocu", pointwise, operator, depthwise, optimize=True).reshape(n, -1)
    return np.concatenate([composed, (gain * bias + offset)[:, None]], axis=1)[None]


def fit_through(
    weight: np.ndarray,
    bias: np.ndarray | None,
    stats: RegressionStats,
    rank: int,
    operator: np.ndarray,
    gain: np.ndarray,
    offset: np.ndarray,
    *,
    rounds: int = ROUNDS,
    ridge: float = 1e-5,
) -> FittedFactors:
    """Rank-``rank`` factors of a group-1 conv ``weight (N, M, *k)`` fitted at the composed target.

    ``stats``: composed patches (``M·Kc`` features) against the depthwise conv's output. Starts from the
    per-channel SVD; the statistics carry a prior towards the original composed kernel, as in the plain fit.
    Errors (``squared_error``, ``data_free_error``) are the depthwise conv's output errors.
    """
    weight = np.asarray(weight, dtype=np.float64)
    n, m = weight.shape[:2]
    kernel_shape = tuple(int(v) for v in weight.shape[2:])
    k = math.prod(kernel_shape)
    taps = operator.shape[1]
    r = max(1, min(int(rank), n, k))
    original_bias = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64)
    gain, offset = np.asarray(gain, dtype=np.float64), np.asarray(offset, dtype=np.float64)
    flat = weight.reshape(n, m, k)
    composed_original = np.einsum("ouk,ock->ocu", operator, flat).reshape(n, m * taps)
    # The loop measures each round's error on the data alone, so the prior goes on a copy of s; composed
    # fits are small (composed_cost bounds them).
    with replace(stats, s=stats.s.copy()).kernel_prior(composed_original) as prior:
        s, t = prior.s[0], prior.t[0]
        # A conv bias whose effect on t is negligible (a filter summing to ~0) is left at its original value.
        free_bias = np.abs(gain) > 1e-6 * max(float(np.abs(operator).sum(axis=(1, 2)).max()), 1e-30)

        start = factorize(channel_spectra(weight), r)
        d = start.depthwise  # (M, r, K)
        p = start.pointwise  # (N, M, r)
        b = original_bias.copy()
        data_free = regression_error(composed_weights(d, p, b, operator, gain, offset), stats)
        best = (data_free, d, p, b)  # the ridge can cost more than a round gains (an exact start at full rank)
        error = data_free
        for _ in range(max(1, rounds)):
            p, b = _solve_pointwise(d, s, t, operator, gain, offset, b, free_bias, ridge)
            d = _solve_depthwise(p, b, s, t, operator, gain, offset, ridge)
            p, b = _solve_pointwise(d, s, t, operator, gain, offset, b, free_bias, ridge)
            new = regression_error(composed_weights(d, p, b, operator, gain, offset), stats)
            if new < best[0]:
                best = (new, d, p, b)
            converged = error - new <= TOLERANCE * max(error, 1e-30)
            error = new
            if converged:
                break
    error, d, p, b = best
    factors = SeparableFactors(depthwise=d, pointwise=p, groups=1, kernel_shape=kernel_shape)
    return FittedFactors(factors=factors, bias=b, squared_error=error, data_free_error=data_free)


def _solve_pointwise(d, s, t, operator, gain, offset, bias, free_bias, ridge):
    """Per output channel, its pointwise weights (and bias, where it reaches ``t``) for fixed filters ``d``."""
    m, r, _k = d.shape
    n = operator.shape[0]
    taps = operator.shape[1]
    f1 = s.shape[0]
    composed = np.einsum("ouk,cjk->ocju", operator, d, optimize=True)  # (N, M, r, Kc)
    design = np.zeros((n, m, taps, m, r))  # features: each (c, j) reads channel c's composed patch
    channels = np.arange(m)
    design[:, channels, :, channels, :] = composed.transpose(1, 0, 3, 2)
    design = design.reshape(n, m * taps, m * r)
    features = np.zeros((n, f1, m * r + 1))
    features[:, :-1, :-1] = design
    features[:, -1, -1] = np.where(free_bias, gain, 0.0)
    target = t - offset[:, None] * s[-1][None, :]  # (N, F+1): Σ (t_o − κ_o) x̄ᵀ
    target -= np.where(free_bias, 0.0, gain * bias)[:, None] * s[-1][None, :]
    projected = s @ features  # (N, F+1, Mr+1)
    gram = np.einsum("nfa,nfb->nab", features, projected)
    cross = np.einsum("nfa,nf->na", features, target)
    diag = np.diagonal(gram, axis1=1, axis2=2)[:, :-1]
    penalty = ridge * np.where(diag.mean(axis=1) > 0, diag.mean(axis=1), 1.0)
    gram[:, np.arange(m * r), np.arange(m * r)] += penalty[:, None]
    fixed = ~free_bias
    gram[fixed, -1, :] = 0.0
    gram[fixed, :, -1] = 0.0
    gram[fixed, -1, -1] = 1.0
    cross[fixed, -1] = bias[fixed]
    solution = np.linalg.solve(gram, cross[..., None])[..., 0]
    return solution[:, :-1].reshape(n, m, r), solution[:, -1]


def _solve_depthwise(p, bias, s, t, operator, gain, offset, ridge):
    """All depthwise filters at once for fixed pointwise weights and bias."""
    n, m, r = p.shape
    taps, k = operator.shape[1:]
    design = np.zeros((n, m, taps, m, r, k))  # t̂_o's patch weights as a linear map of every filter tap
    channels = np.arange(m)
    design[:, channels, :, channels, :, :] = np.einsum("ocj,ouk->cojuk", p, operator).transpose(0, 1, 3, 2, 4)
    design = design.reshape(n, m * taps, m * r * k)
    constant = gain * bias + offset
    target = t[:, :-1] - constant[:, None] * s[-1][None, :-1]  # (N, F)
    xx = s[:-1, :-1]
    gram = np.einsum("nfa,fg,ngb->ab", design, xx, design, optimize=True)
    cross = np.einsum("nfa,nf->a", design, target)
    gram += relative_ridge(np.diag(gram), ridge) * np.eye(gram.shape[0])
    solution = np.linalg.solve(gram, cross)
    return solution.reshape(m, r, k)
