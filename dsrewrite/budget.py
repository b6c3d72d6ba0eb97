"""Rank choice per layer and rank allocation under a MAC budget (pure).

``--rank auto`` picks, per layer, the smallest rank whose estimated relative
output error is within ``max_error`` and whose rewrite costs fewer MACs than
the original conv. Without calibration data the estimate is the relative
Frobenius error of the factorised kernel, which equals the relative output
error for white (uncorrelated) inputs; with calibration data it is the error of
the factors fitted to that data.

``--target-macs`` allocates ranks across layers (:func:`allocate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# Relative RMS output error allowed per layer under --rank auto.
DEFAULT_MAX_ERROR = 0.1


@dataclass(frozen=True)
class RankChoice:
    rank: int | None  # None: leave the layer alone
    reason: str | None


def choose_auto_rank(
    errors: Sequence[float], macs_per_pixel_at_rank: Sequence[int], original_macs_per_pixel: int, max_error: float
) -> RankChoice:
    """Smallest rank ``r ≥ 1`` with ``errors[r] ≤ max_error`` that saves MACs.

    ``errors[r]`` and ``macs_per_pixel_at_rank[r]`` are indexed by rank
    (index 0 unused); both lists run up to full rank.
    """
    full = len(errors) - 1
    for r in range(1, full + 1):
        if errors[r] <= max_error:
            if macs_per_pixel_at_rank[r] < original_macs_per_pixel:
                return RankChoice(r, None)
            ratio = macs_per_pixel_at_rank[r] / original_macs_per_pixel
            return RankChoice(
                None,
                f"error <= {max_error:g} needs rank {r} of {full}, which costs {ratio:.2f}x the original MACs",
            )
    return RankChoice(None, f"no rank reaches error <= {max_error:g}")


# -- allocation under a MAC budget -------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCurve:
    """What each rank of one conv costs and how much output error it is estimated to add.

    ``macs[r]`` and ``errors[r]`` for ``r = 1..len-1`` (index 0 unused); only
    ranks that cost fewer MACs than the original appear. ``errors`` are
    normalised MSEs (squared relative errors), so they add across layers.
    """

    key: str
    macs_before: int
    macs: tuple[int, ...]
    errors: tuple[float, ...]

    @property
    def max_rank(self) -> int:
        return len(self.macs) - 1

    def states(self) -> list[tuple[int, float, int | None]]:
        """(MACs, error, rank) from the original (rank None) down to rank 1; unestimated ranks left out."""
        points = [(self.macs_before, 0.0, None)]
        points += [(self.macs[r], self.errors[r], r) for r in range(self.max_rank, 0, -1) if math.isfinite(self.errors[r])]
        return points


@dataclass(frozen=True)
class Allocation:
    ranks: dict[str, int | None]  # None: leave the conv alone
    macs_before: int
    macs_after: int
    estimated_error: float

    @property
    def ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0


def allocate(curves: Sequence[ErrorCurve], target: float, fill_curves: Sequence[ErrorCurve] | None = None) -> Allocation:
    """Ranks that keep total MACs ≤ ``target``·(MACs before), adding as little estimated error as possible.

    1. Greedy descent on each conv's lower convex hull of (MACs, error): always
       take the step, over all convs, with the least error added per MAC saved,
       until the budget is met. For convex curves this is the optimal
       allocation of the relaxed problem (the classic rate-distortion argument).
    2. Fill-up: the last step usually overshoots; while some conv can move to a
       costlier, more accurate state without breaking the budget, take the move
       that removes the most error per MAC spent. ``fill_curves`` (same convs, same
       order) may offer more states for this step than ``curves`` did for the first,
       e.g. ranks that save time less efficiently but still fit the budget.
    3. No worse than a uniform rank: a uniform rank within the budget with less estimated error replaces the result.
    Deterministic: ties go to the earlier conv.
    """
    total_before = sum(c.macs_before for c in curves)
    budget = target * total_before
    hulls = [_lower_hull(c.states()) for c in curves]
    position = [0] * len(curves)  # index into each hull
    total = total_before
    while total > budget:
        best, best_slope = None, None
        for i, hull in enumerate(hulls):
            if position[i] + 1 < len(hull):
                (m0, e0, _), (m1, e1, _) = hull[position[i]], hull[position[i] + 1]
                slope = (e1 - e0) / max(m0 - m1, 1)
                if best_slope is None or slope < best_slope:
                    best, best_slope = i, slope
        if best is None:
            break  # every conv is at its cheapest rank
        total -= hulls[best][position[best]][0] - hulls[best][position[best] + 1][0]
        position[best] += 1
    chosen = [hulls[i][position[i]] for i in range(len(curves))]

    # Fill-up over all states (not only hull points).
    improved = True
    while improved:
        improved = False
        best = None
        for i, curve in enumerate(fill_curves or curves):
            macs_now, err_now, _ = chosen[i]
            for state in curve.states():
                extra = state[0] - macs_now
                gain = err_now - state[1]
                if extra > 0 and gain > 0 and total + extra <= budget:
                    score = gain / extra
                    if best is None or score > best[0]:
                        best = (score, i, state, extra)
        if best is not None:
            _, i, state, extra = best
            chosen[i] = state
            total += extra
            improved = True
    chosen, total = _no_worse_than_uniform(curves, chosen, total, budget)
    return Allocation(
        ranks={c.key: state[2] for c, state in zip(curves, chosen)},
        macs_before=total_before,
        macs_after=int(total),
        estimated_error=float(sum(state[1] for state in chosen)),
    )


def _no_worse_than_uniform(curves: Sequence[ErrorCurve], chosen: list, total: float, budget: float) -> tuple[list, float]:
    """The greedy descent can step past a uniform-rank state that the fill-up cannot climb back to (one conv at
    rank 1 before another leaves its original). So every uniform rank that fits the budget (a conv without that
    rank stays original) is a candidate too; the lowest estimated error wins, ties to the allocation."""
    best_error = sum(state[1] for state in chosen)
    ranks = sorted({state[2] for curve in curves for state in curve.states() if state[2] is not None})
    for rank in ranks:
        states = [next((s for s in curve.states() if s[2] == rank), curve.states()[0]) for curve in curves]
        macs = sum(s[0] for s in states)
        error = sum(s[1] for s in states)
        if macs <= budget and error < best_error:
            chosen, total, best_error = states, macs, error
    return chosen, total


def _lower_hull(states: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """Lower convex hull of the states in (MACs saved, error), from the original to the cheapest.

    Slopes along the hull increase, so greedy steps come in order of cost-effectiveness.
    """
    before = states[0][0]
    points = sorted(states, key=lambda s: (before - s[0], s[1]))
    hull: list[tuple[int, float, int | None]] = []
    for p in points:
        if hull and p[0] == hull[-1][0]:
            continue  # same cost, more error: never better
        while len(hull) >= 2:
            (m1, e1, _), (m2, e2, _) = hull[-2], hull[-1]
            # Cross product of (hull[-2] -> hull[-1]) and (hull[-2] -> p) in (saved, error) coordinates.
            cross = ((m1 - m2) * (p[1] - e1)) - ((e2 - e1) * (m1 - p[0]))
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def costing_pixels(plans) -> tuple[list, dict[str, int], bool]:
    """The eligible convs with error curves, the output pixels each one's per-pixel MACs count for, and whether
    MACs are absolute. When some conv's MACs are unknown (dynamic spatial dims), every conv counts one pixel: MACs
    per output pixel, so the units still agree across convs."""
    eligible = [p for p in plans if p.eligible and p.error_at_rank]
    absolute = all(p.macs_before is not None for p in eligible)
    pixels = {p.output: p.macs_before // p.macs_per_pixel_before if absolute else 1 for p in eligible}
    return eligible, pixels, absolute


def curves_from_plans(plans) -> tuple[list[ErrorCurve], bool]:
    """Error curves of the eligible convs of a plan, and whether MACs are absolute (``costing_pixels``).

    Per-rank MACs follow ``cost.separable_cost`` (``LayerPlan.macs_per_pixel_at``).
    """
    eligible, pixels, absolute = costing_pixels(plans)
    curves = []
    for p in eligible:
        before = p.macs_per_pixel_before * pixels[p.output]
        macs, errors = [0], [0.0]
        for r, error in enumerate(p.error_at_rank, start=1):
            cost = p.macs_per_pixel_at(r) * pixels[p.output]
            if cost >= before:
                break
            macs.append(cost)
            errors.append(error)
        curves.append(ErrorCurve(key=p.output, macs_before=before, macs=tuple(macs), errors=tuple(errors)))
    return curves, absolute


def smallest_rank_within(curve: ErrorCurve, max_error: float) -> int | None:
    """``--rank auto`` on a curve: the cheapest rank with sqrt(NMSE) ≤ max_error, if one saves MACs."""
    for r in range(1, curve.max_rank + 1):
        if math.isfinite(curve.errors[r]) and math.sqrt(max(curve.errors[r], 0.0)) <= max_error:
            return r
    return None
