"""Graph passes. Each module holds one pass and opens with a Before/After sketch and its math.

``REGISTRY`` maps the snake_case pass name (the word used by ``--passes``, the
report and error messages) to its class. :data:`DEFAULT_PASSES` is the pipeline
``dsrewrite`` runs; ``decompose_conv`` marks where the staged rewrite (analyse,
measure, decide, fit, emit) happens, the passes before it prepare the model
and the passes after it finish the rewritten one. :func:`resolve_passes` turns a
declarative list (registry names, ``module:Class`` references, pass objects)
into pass objects.
"""

from __future__ import annotations

import importlib

from dsrewrite.errors import UsageError
from dsrewrite.pipeline import Pass

from .analyse_convs import AnalyseConvs
from .cleanup import Cleanup
from .decompose_conv import DecomposeConv, DecomposeOptions
from .fold_batchnorm import FoldBatchNorm

REGISTRY: dict[str, type] = {
    FoldBatchNorm.name: FoldBatchNorm,
    AnalyseConvs.name: AnalyseConvs,
    DecomposeConv.name: DecomposeConv,
    Cleanup.name: Cleanup,
}

DEFAULT_PASSES: tuple[str, ...] = ("fold_batchnorm", "decompose_conv", "cleanup")


def default_passes(decompose: DecomposeOptions | None = None) -> list:
    """fold_batchnorm -> decompose_conv -> cleanup, for running with :class:`~dsrewrite.Pipeline` directly."""
    return [FoldBatchNorm(), DecomposeConv(decompose or DecomposeOptions()), Cleanup()]


def resolve_passes(entries) -> list[Pass]:
    """Pass objects for ``entries``: registry names, ``"package.module:ClassName"`` or pass objects.

    A class or reference is instantiated without arguments. Raises UsageError for
    anything that is not a pass.
    """
    passes = []
    for entry in entries:
        if isinstance(entry, str):
            entry = REGISTRY.get(entry) or _import_pass(entry)
        if isinstance(entry, type):
            entry = entry()
        if not isinstance(entry, Pass):
            raise UsageError(f"not a pass (needs a name and run(graph, context)): {entry!r}")
        passes.append(entry)
    return passes


def _import_pass(reference: str) -> type:
    module_name, _, attribute = reference.partition(":")
    if not attribute:
        known = ", ".join(REGISTRY)
        raise UsageError(f"unknown pass {reference!r}: use one of {known} or package.module:ClassName")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot load pass {reference!r}: {type(exc).__name__}: {exc}") from None


__all__ = [
    "AnalyseConvs", "Cleanup", "DEFAULT_PASSES", "DecomposeConv", "DecomposeOptions", "FoldBatchNorm", "REGISTRY",
    "default_passes", "resolve_passes",
]  # fmt: skip
