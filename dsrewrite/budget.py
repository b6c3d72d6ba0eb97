"""Rank choice per layer (pure).

``--rank auto`` picks, per layer, the smallest rank whose estimated relative
output error is within ``max_error`` and whose rewrite costs fewer MACs than
the original conv. Without calibration data the estimate is the relative
Frobenius error of the factorised kernel, which equals the relative output
error for white (uncorrelated) inputs.
"""

from __future__ import annotations

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
                f"rank {r} is needed for error <= {max_error:g} (error {errors[r]:.3g}) "
                f"but costs {ratio:.2f}x the original MACs",
            )
    return RankChoice(None, f"no rank reaches error <= {max_error:g}")
