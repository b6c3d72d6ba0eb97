"""Graph passes. Each module holds one pass and opens with a Before/After sketch and its math.

The registry maps the snake_case pass name (used by the CLI and the report)
to its class; :func:`default_passes` is the pipeline ``dsrewrite`` runs.
"""

from __future__ import annotations

from .cleanup import Cleanup
from .decompose_conv import DecomposeConv, DecomposeOptions
from .fold_batchnorm import FoldBatchNorm

REGISTRY = {
    FoldBatchNorm.name: FoldBatchNorm,
    DecomposeConv.name: DecomposeConv,
    Cleanup.name: Cleanup,
}


def default_passes(decompose: DecomposeOptions | None = None) -> list:
    """fold_batchnorm -> decompose_conv -> cleanup."""
    return [FoldBatchNorm(), DecomposeConv(decompose or DecomposeOptions()), Cleanup()]


__all__ = ["Cleanup", "DecomposeConv", "DecomposeOptions", "FoldBatchNorm", "REGISTRY", "default_passes"]
