"""Fit a conv's separable factors to its *activated* output (numpy only).

A conv followed by per-channel affine ops (folded BatchNorm as Mul/Add, ...) and
an elementwise activation computes ``g(y) = f(a·y + c)`` per output channel. The
linear fit (``lowrank.fit_separable``) matches ``y`` everywhere, also where the
activation throws the difference away (a ReLU's negative side). Following Zhang
et al. 2015 ("Accelerating Very Deep Convolutional Networks ..."), we start from
the linear closed-form fit and then alternate:

1. **z-step**, per output element: ``z = argmin (g(z) − g(y))² + λ·(z − ŷ)²``
   with ``y`` the original output and ``ŷ`` the current prediction. Exact for
   piecewise-linear ``f`` (the best clamped minimiser over its linear pieces);
   for smooth ``f`` a few Gauss–Newton steps from ``ŷ`` and from ``y``, best kept.
2. **factor step**: alternating least squares towards ``z`` (``lowrank.refine_separable``).
   It needs ``Σ z x̄ᵀ = T + Σ (z − y) x̄ᵀ``. ``T = Σ y x̄ᵀ`` and ``S = Σ x̄ x̄ᵀ``
   are the streamed sums over every sampled position; the correction, zero
   wherever ``z = y``, is estimated on a bounded in-memory sample of positions
   and scaled by (positions / sample rows), so the estimate is unbiased and
   exact when the sample is everything.

``λ`` grows geometrically (1e-3 to 1e-2 over 3 iterations of 2 ALS rounds by
default: on captcha_crnn's convs the best iterate came within the first three,
and longer schedules to λ = 1 as in the paper only cost time). The iterate with
the lowest activated error on the sample is kept, and only if it beats the
linear fit there; otherwise the linear fit stands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .heap import release_free_memory
from .lowrank import RegressionStats, SeparableFactors, dense_weights, refine_separable

# Activations whose f is piecewise linear: their z-step is exact.
PIECEWISE = ("relu", "clip")
KINDS = ("relu", "clip", "hard_gate", "silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class Activation:
    """``g(y) = f(scale·y + shift)`` per output channel.

    ``kind``: ``relu`` (``slope`` on the negative side: Relu 0, LeakyRelu α, PRelu
    per channel), ``clip`` (``low``..``high``; Relu6), ``hard_gate``
    (``u·clip(alpha·u + beta, 0, 1)``: HardSwish, HardSigmoid·x), ``silu``
    (``u·σ(gain·u)``), ``gelu`` (erf form), ``gelu_tanh``. ``label`` says how the
    pattern appears in the graph, for the report.
    """

    kind: str
    scale: np.ndarray | float = 1.0
    shift: np.ndarray | float = 0.0
    slope: np.ndarray | float = 0.0
    low: float = 0.0
    high: float = 6.0
    alpha: float = 1.0 / 6.0
    beta: float = 0.5
    gain: float = 1.0
    label: str = field(default="", compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown activation kind {self.kind!r}")


def activate(act: Activation, y: np.ndarray) -> np.ndarray:
    """``g(y)`` for outputs ``y (..., N)`` (channels last)."""
    return forward(act, act.scale * y + act.shift)


def forward(act: Activation, u: np.ndarray) -> np.ndarray:
    """``f(u)``, the activation itself (channels last)."""
    if act.kind == "relu":
        return np.where(u > 0, u, act.slope * u)
    if act.kind == "clip":
        return np.clip(u, act.low, act.high)
    if act.kind == "hard_gate":
        return u * np.clip(act.alpha * u + act.beta, 0.0, 1.0)
    if act.kind == "silu":
        return u * _sigmoid(act.gain * u)
    if act.kind == "gelu":
        return 0.5 * u * (1.0 + erf(u / np.sqrt(2.0)))
    inner = np.sqrt(2.0 / np.pi) * (u + 0.044715 * u * u * u)
    return 0.5 * u * (1.0 + np.tanh(inner))


def derivative(act: Activation, u: np.ndarray) -> np.ndarray:
    """``f'(u)`` (one-sided where ``f`` has a kink)."""
    if act.kind == "relu":
        return np.where(u > 0, 1.0, act.slope * np.ones_like(u))
    if act.kind == "clip":
        return ((u > act.low) & (u < act.high)).astype(u.dtype)
    if act.kind == "hard_gate":
        gate = act.alpha * u + act.beta
        return np.clip(gate, 0.0, 1.0) + u * act.alpha * ((gate > 0) & (gate < 1))
    if act.kind == "silu":
        s = _sigmoid(act.gain * u)
        return s + act.gain * u * s * (1.0 - s)
    if act.kind == "gelu":
        return 0.5 * (1.0 + erf(u / np.sqrt(2.0))) + u * np.exp(-0.5 * u * u) / np.sqrt(2.0 * np.pi)
    c = np.sqrt(2.0 / np.pi)
    th = np.tanh(c * (u + 0.044715 * u * u * u))
    return 0.5 * (1.0 + th) + 0.5 * u * (1.0 - th * th) * c * (1.0 + 3 * 0.044715 * u * u)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): numpy has none."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def _pieces(act: Activation) -> list[tuple[float, float, np.ndarray | float, float]]:
    """``(lo, hi, slope, offset)`` of each linear piece of a piecewise-linear ``f``."""
    if act.kind == "relu":
        return [(-np.inf, 0.0, act.slope, 0.0), (0.0, np.inf, 1.0, 0.0)]
    pieces = [(act.low, act.high, 1.0, 0.0)]
    if np.isfinite(act.low):
        pieces.append((-np.inf, act.low, 0.0, act.low))
    if np.isfinite(act.high):
        pieces.append((act.high, np.inf, 0.0, act.high))
    return pieces


def z_step(act: Activation, y: np.ndarray, prediction: np.ndarray, lam: float, newton_steps: int = 6) -> np.ndarray:
    """Per element, ``argmin_z (g(z) − g(y))² + lam·(z − prediction)²`` (channels last)."""
    a = np.broadcast_to(np.asarray(act.scale, dtype=np.float64), y.shape[-1:])
    flat = a == 0  # g is constant there: only the penalty counts
    a_safe = np.where(flat, 1.0, a)
    target = activate(act, y)
    u_hat = a_safe * prediction + act.shift
    mu = lam / (a_safe * a_safe)  # the penalty in u = a·z + c units
    if act.kind in PIECEWISE:
        best_u, best_cost = None, None
        for lo, hi, s, o in _pieces(act):
            u = np.clip((s * (target - o) + mu * u_hat) / (s * s + mu), lo, hi)
            cost = (s * u + o - target) ** 2 + mu * (u - u_hat) ** 2
            best_u, best_cost = _lower(best_u, best_cost, u, cost)
        u = best_u
    else:
        u = _gauss_newton(act, target, u_hat, mu, [u_hat, a_safe * y + act.shift], newton_steps)
    return np.where(flat, prediction, (u - act.shift) / a_safe)


def _gauss_newton(act, target, u_hat, mu, starts, steps):
    """Damped Gauss–Newton on ``(f(u) − t)² + mu·(u − û)²`` per element from each start; the best end point."""

    def cost(u):
        return (forward(act, u) - target) ** 2 + mu * (u - u_hat) ** 2

    best_u, best_cost = None, None
    for u in starts:
        u = np.array(u, dtype=np.float64)
        c = cost(u)
        for _ in range(steps):
            fu, du = forward(act, u), derivative(act, u)
            step = (du * (target - fu) + mu * (u_hat - u)) / (du * du + mu)
            trial = u + step
            trial_cost = cost(trial)
            better = trial_cost < c
            u = np.where(better, trial, u)
            c = np.where(better, trial_cost, c)
        best_u, best_cost = _lower(best_u, best_cost, u, c)
    return best_u


def _lower(best_u, best_cost, u, cost):
    """Per element, the candidate of lower cost (the first kept on ties); ``best_u`` None: the first candidate."""
    if best_u is None:
        return u, cost
    better = cost < best_cost
    return np.where(better, u, best_u), np.where(better, cost, best_cost)


def predict(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Outputs ``(P, N)`` of per-group dense weights ``W̄ (g, N/g, F+1)`` on patch rows ``x (P, g·F)``."""
    g, _ng, f1 = weights.shape
    f = f1 - 1
    x = _single(x)
    parts = []
    for gi in range(g):
        w = weights[gi].astype(x.dtype)
        parts.append(x[:, gi * f : (gi + 1) * f] @ w[:, :f].T + w[:, f])
    return np.concatenate(parts, axis=1)


def activated_error(act: Activation, weights: np.ndarray, x: np.ndarray, target: np.ndarray) -> float:
    """``Σ (g(ŷ) − g(y))²`` on the sample, ``target = g(y)``."""
    total = 0.0
    for rows in row_bands(len(x), target.shape[-1]):
        diff = activate(act, predict(weights, x[rows]).astype(np.float64)) - target[rows]
        total += float(np.vdot(diff, diff))
    return total


def _single(x: np.ndarray) -> np.ndarray:
    """float16 rows (a ``RowSample``'s patches) as float32: numpy has no fast float16 matrix product."""
    return x.astype(np.float32) if x.dtype == np.float16 else x


_BAND_BYTES = 8 * 2**20  # one float64 (rows, N) array of a row band


def row_bands(rows: int, columns: int) -> list[slice]:
    """Row ranges whose ``(rows, columns)`` float64 arrays take about ``_BAND_BYTES`` each.

    Everything per sample row is elementwise or a sum over rows, so a band at a time gives the same result
    while the z-step's temporaries (half a dozen of them) stay small: whole, a 512-channel conv's 13k-row
    sample made each 54 MB.
    """
    step = max(1, _BAND_BYTES // (8 * max(columns, 1)))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


@dataclass(frozen=True)
class ActivatedFit:
    """The outcome: the factors and bias to use, and the activated NMSE on the sample of them and of the linear fit."""

    factors: SeparableFactors
    bias: np.ndarray
    improved: bool  # False: the linear fit is returned unchanged
    error: float
    error_linear: float
    iterations: int


def fit_activated(
    weight: np.ndarray,
    factors: SeparableFactors,
    bias: np.ndarray,
    stats: RegressionStats,
    x: np.ndarray,
    y: np.ndarray,
    act: Activation,
    *,
    iterations: int = 3,
    rounds: int = 2,
    ridge: float = 1e-5,
    lam_start: float = 1e-3,
    lam_end: float = 1e-2,
) -> ActivatedFit:
    """Refine a linear fit of one conv so its activated output matches the original's.

    ``weight``: the original kernel (for the fit's kernel prior); ``factors``/``bias``:
    the linear fit; ``stats``: the streamed sums over all sampled positions (no prior);
    ``x (P, g·F)`` and ``y (P, N)``: a uniform sample of those positions' patches and
    original outputs. Errors are normalised by the centred energy of ``g(y)`` on the sample.
    """
    x = np.asarray(x)
    g, ng, f1 = stats.t.shape
    rows = x.shape[0]
    bands = row_bands(rows, g * ng)
    target = np.empty(y.shape)  # g(y), float64, built a band at a time
    for band in bands:
        target[band] = activate(act, np.asarray(y[band], dtype=np.float64))
    mean = target.mean(axis=0)
    norm = sum(float(np.sum((target[band] - mean) ** 2)) for band in bands) or 1.0
    scale_up = stats.count / max(rows, 1)

    best_factors, best_bias = factors, bias
    linear = activated_error(act, dense_weights(factors, bias), x, target)
    best, used = linear, 0
    lams = np.geomspace(lam_start, lam_end, iterations) if iterations > 1 else [lam_end]
    for i, lam in enumerate(lams[:iterations], start=1):
        weights = dense_weights(factors, bias)
        correction = np.zeros_like(stats.t)
        for band in bands:
            rows_x, y64 = _single(x[band]), np.asarray(y[band], dtype=np.float64)
            z = z_step(act, y64, predict(weights, rows_x).astype(np.float64), float(lam))
            moved = (z - y64).astype(rows_x.dtype)
            for gi in range(g):
                block = moved[:, gi * ng : (gi + 1) * ng]
                correction[gi, :, :-1] += block.T @ rows_x[:, gi * (f1 - 1) : (gi + 1) * (f1 - 1)]
                correction[gi, :, -1] += block.sum(axis=0)
        towards_z = RegressionStats(
            s=stats.s, t=stats.t + scale_up * correction, energy=stats.energy,
            centred_energy=stats.centred_energy, count=stats.count,
        )  # fmt: skip
        with towards_z.kernel_prior(weight) as prior:  # raises stats.s's diagonal until the solve is done
            factors, bias = refine_separable(factors, prior, rounds=rounds, ridge=ridge)
        release_free_memory()  # each refinement frees 0.1-0.2 GB of temporaries for a 512-channel conv
        error = activated_error(act, dense_weights(factors, bias), x, target)
        if error < best:
            best_factors, best_bias, best, used = factors, bias, error, i
    return ActivatedFit(
        factors=best_factors, bias=best_bias, improved=used > 0, error=best / norm, error_linear=linear / norm, iterations=used
    )

