"""MACs and parameter counts of convolutions and their separable rewrites (pure).

MACs count multiply-accumulates of the convolution itself for one inference at
the given shapes; bias additions and the Concat copy are not counted. Per output
pixel a conv with ``M`` inputs, ``N`` outputs, ``g`` groups and ``K`` kernel taps
costs ``N·(M/g)·K``. Its rank-``r`` rewrite costs ``r·M·K`` (depthwise) plus
``r·(M/g)·N`` (pointwise), a ratio of ``r/N + r/K`` when ``g = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """``macs`` is None when an output dim is unknown; ``macs_per_pixel`` is always known."""

    macs: int | None
    params: int
    macs_per_pixel: int


def conv_cost(
    in_channels: int, out_channels: int, kernel_size: int, group: int, pixels: int | None, has_bias: bool
) -> Cost:
    per_pixel = out_channels * (in_channels // group) * kernel_size
    params = per_pixel + (out_channels if has_bias else 0)
    return Cost(macs=None if pixels is None else per_pixel * pixels, params=params, macs_per_pixel=per_pixel)


def separable_cost(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    group: int,
    rank: int,
    pixels: int | None,
    has_bias: bool,
) -> Cost:
    depthwise = rank * in_channels * kernel_size
    pointwise = rank * (in_channels // group) * out_channels
    per_pixel = depthwise + pointwise
    params = per_pixel + (out_channels if has_bias else 0)
    return Cost(macs=None if pixels is None else per_pixel * pixels, params=params, macs_per_pixel=per_pixel)


def projected_cost(
    in_channels: int, out_channels: int, kernel_size: int, rank: int, projection_per_pixel: int, pixels: int | None, has_bias: bool
) -> Cost:
    """The input-projected rewrite (``dsrewrite.projection``): a 1×1 mix of the inputs into one channel, ``rank``
    spatial filters on it, a pointwise conv. ``projection_per_pixel``: the mix's MACs per *output* pixel (``M`` per
    input pixel, so ``M·s²`` at stride ``s``)."""
    per_pixel = projection_per_pixel + rank * kernel_size + rank * out_channels
    params = in_channels + rank * kernel_size + rank * out_channels + (out_channels if has_bias else 0)
    return Cost(macs=None if pixels is None else per_pixel * pixels, params=params, macs_per_pixel=per_pixel)
