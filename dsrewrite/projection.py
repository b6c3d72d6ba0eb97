"""The input-projected rewrite of a conv with few input channels (numpy only).

A stem conv reads an image: 3 (or 2, or 4) channels that move together, because
colour varies far less than brightness. Its per-channel SVD spends a rank on
every channel. The projected form spends it once::

    x ─ Conv(q: 1×M×1, 1×1) ─ Conv(D: r×1×k, strides, pads, dilations) ─ Conv(P: N×r×1, b) ─ y

The M input channels are mixed into one by ``q`` (a 1×1 conv at the input's
resolution), that single channel gets ``r`` spatial filters, and a pointwise
conv mixes them into the N outputs. It costs ``r·(K + N)`` MACs per output
pixel plus ``M`` per input pixel, against ``r·M·(K + N)`` for the separable
rank ``r``: on PP-OCR's 3→8 stem, rank 3 projected costs 0.29 of the conv and
has a fifth of the separable rank 1's layer error, and rank 5 (0.45) a sixth of
rank 2's (0.47).

It is the separable rank-``r`` rewrite with tied weights (depthwise filter
``q_m·D_j`` on every channel ``m``, pointwise weight ``P[n, j]`` for every
channel), so :meth:`ProjectedFactors.separable` computes the same function with
the separable machinery (dense kernels, output probes, fits of later layers).

It only pays when the input channels are correlated, which only data shows, so
it is fitted to calibration statistics (:func:`fit_projected`): for each
direction ``q`` the best rank-``r`` ``P·D`` is a whitened SVD, and ``q`` is
searched on a grid over the sphere, then refined by alternating least squares.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .lowrank import RegressionStats, SeparableFactors, reconstruct, regression_error

# Input channels a projected rewrite is tried for: image stems (grey + alpha, RGB, RGBA). With more channels the
# grid search over directions grows and one direction rarely carries the input.
MAX_PROJECTED_CHANNELS = 4
# Grid points per angle of the direction search, and alternating rounds after it.
_GRID_STEPS = {2: 180, 3: 48, 4: 16}
_ROUNDS = 12
_RIDGE = 1e-6


@dataclass(frozen=True)
class ProjectedFactors:
    """``projection (M,)``: the 1×1 mix of the inputs; ``depthwise (r, K)``: the single channel's filters;
    ``pointwise (N, r)``."""

    projection: np.ndarray
    depthwise: np.ndarray
    pointwise: np.ndarray
    kernel_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.depthwise.shape[0]

    def separable(self) -> SeparableFactors:
        """The same function as tied separable factors (group 1)."""
        m, (n, r) = self.projection.shape[0], self.pointwise.shape
        return SeparableFactors(
            depthwise=self.projection[:, None, None] * self.depthwise[None],
            pointwise=np.ascontiguousarray(np.broadcast_to(self.pointwise[:, None, :], (n, m, r))),
            groups=1,
            kernel_shape=self.kernel_shape,
        )


@dataclass(frozen=True)
class FittedProjection:
    factors: ProjectedFactors
    bias: np.ndarray
    squared_error: float  # Σ ‖y − ŷ‖² on the statistics


def can_project(in_channels: int | None, group: int) -> bool:
    return group == 1 and in_channels is not None and 2 <= in_channels <= MAX_PROJECTED_CHANNELS


def fit_projected(weight: np.ndarray, bias: np.ndarray | None, stats: RegressionStats, rank: int) -> FittedProjection:
    """Rank-``rank`` projected factors and bias that minimise ``Σ ‖y − ŷ‖²`` on a group-1 conv's statistics."""
    weight = np.asarray(weight, dtype=np.float64)
    n, m = weight.shape[:2]
    kernel_shape = tuple(int(k) for k in weight.shape[2:])
    taps = math.prod(kernel_shape)
    s, t = stats.s[0], stats.t[0]
    count = max(float(s[-1, -1]), 1.0)
    mean_x, mean_y = s[-1, :-1] / count, t[:, -1] / count
    cxx = s[:-1, :-1] / count - np.outer(mean_x, mean_x)
    cyx = t[:, :-1] / count - np.outer(mean_y, mean_x)
    q, d, p = _fit_centred(cxx, cyx, m, taps, min(int(rank), n, taps))
    # The bias puts the means right: ŷ(x̄) = ȳ.
    fitted_bias = mean_y - p @ d @ np.kron(q, np.eye(taps)) @ mean_x
    factors = ProjectedFactors(projection=q, depthwise=d, pointwise=p, kernel_shape=kernel_shape)
    dense = reconstruct(factors.separable()).reshape(1, n, m * taps)
    error = regression_error(np.concatenate([dense, fitted_bias.reshape(1, n, 1)], axis=2), stats)
    return FittedProjection(factors, fitted_bias, error)


def data_free_projected(weight: np.ndarray, rank: int) -> ProjectedFactors:
    """The projected factors for white inputs (no data): of the right shapes, rarely accurate (timing, plans)."""
    weight = np.asarray(weight, dtype=np.float64)
    n, m = weight.shape[:2]
    kernel_shape = tuple(int(k) for k in weight.shape[2:])
    taps = math.prod(kernel_shape)
    q, d, p = _fit_centred(np.eye(m * taps), weight.reshape(n, m * taps), m, taps, min(int(rank), n, taps))
    return ProjectedFactors(projection=q, depthwise=d, pointwise=p, kernel_shape=kernel_shape)


def _fit_centred(cxx: np.ndarray, cyx: np.ndarray, m: int, taps: int, rank: int):
    """Minimise ``tr((C_yx-part) …)``: E‖(y−ȳ) − P·D·(qᵀ⊗I)(x−x̄)‖² over unit ``q``, ``D (r, K)``, ``P (N, r)``."""
    best = max(_directions(m), key=lambda q: _captured(q, cxx, cyx, taps, rank)[0])
    q = best
    _, d, p = _captured(q, cxx, cyx, taps, rank)
    for _ in range(_ROUNDS):
        q = _solve_direction(p @ d, cxx, cyx, m, taps, fallback=q)
        _, d, p = _captured(q, cxx, cyx, taps, rank)
    return q, d, p


def _directions(m: int) -> list[np.ndarray]:
    """Unit vectors covering half of the sphere in ``R^m`` (``q`` and ``−q`` are the same projection)."""
    steps = _GRID_STEPS[m]
    angles = [np.linspace(0.0, np.pi, steps, endpoint=False)] * (m - 1)
    out = []
    for combo in itertools.product(*angles):
        v = np.ones(m)
        for i, a in enumerate(combo):  # hyperspherical coordinates
            v[i] *= np.cos(a)
            v[i + 1 :] *= np.sin(a)
        out.append(v / np.linalg.norm(v))
    return out


def _captured(q: np.ndarray, cxx: np.ndarray, cyx: np.ndarray, taps: int, rank: int):
    """Output variance captured by the best rank-``rank`` ``P·D`` on the projection ``q``, and that ``D``, ``P``."""
    t = np.kron(q, np.eye(taps))  # (K, M·K)
    czz = t @ cxx @ t.T
    czz += (_RIDGE * max(np.trace(czz), 1e-30) / taps) * np.eye(taps)
    cyz = cyx @ t.T
    lower = np.linalg.cholesky(czz)
    whitened = np.linalg.solve(lower, cyz.T).T  # Cyz L⁻ᵀ
    u, sv, vt = np.linalg.svd(whitened, full_matrices=False)
    r = min(rank, sv.size)
    d = np.linalg.solve(lower.T, vt[:r].T).T * np.sqrt(sv[:r])[:, None]  # rows of √s·vᵀ·L⁻¹
    p = u[:, :r] * np.sqrt(sv[:r])
    return float(np.sum(sv[:r] ** 2)), d, p


def _solve_direction(b: np.ndarray, cxx: np.ndarray, cyx: np.ndarray, m: int, taps: int, fallback: np.ndarray) -> np.ndarray:
    """The best ``q`` for a fixed ``B = P·D`` (linear least squares in ``q``), normalised."""
    blocks = [slice(c * taps, (c + 1) * taps) for c in range(m)]
    gram = np.array([[np.sum((b @ cxx[bi, bj]) * b) for bj in blocks] for bi in blocks])
    rhs = np.array([np.sum(cyx[:, bi] * b) for bi in blocks])
    try:
        q = np.linalg.solve(gram + 1e-12 * np.trace(gram) * np.eye(m), rhs)
    except np.linalg.LinAlgError:
        return fallback
    norm = np.linalg.norm(q)
    return q / norm if norm > 0 and np.all(np.isfinite(q)) else fallback
