"""dsrewrite: rewrite ONNX convolutions into depthwise + pointwise convolutions.

>>> import dsrewrite
>>> result = dsrewrite.rewrite("model.onnx", rank=1)          # doctest: +SKIP
>>> dsrewrite.save_model(result.model, "slim.onnx")            # doctest: +SKIP
>>> result.report.totals.eligible_macs_ratio                   # doctest: +SKIP
"""

from ._version import __version__

# The public API loads lazily (PEP 562): `import dsrewrite` stays cheap, so the
# command line can put the heavy imports (onnx, onnxruntime) under its own
# interrupt handling.
_EXPORTS = {
    "RewriteOptions": "api",
    "RewriteResult": "api",
    "rewrite": "api",
    "DsrewriteError": "errors",
    "InputError": "errors",
    "PassError": "errors",
    "UsageError": "errors",
    "VerificationError": "errors",
    "load_model": "model_io",
    "save_model": "model_io",
    "Pass": "pipeline",
    "PassContext": "pipeline",
    "PassResult": "pipeline",
    "Pipeline": "pipeline",
    "LayerPlan": "plan",
    "Report": "report",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    import importlib  # noqa: PLC0415

    module = _EXPORTS.get(name)
    if module is None:
        if name.startswith("_"):
            raise AttributeError(f"module 'dsrewrite' has no attribute {name!r}")
        try:  # a submodule, e.g. dsrewrite.passes or dsrewrite.lowrank
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule exists but something it needs is missing
            raise AttributeError(f"module 'dsrewrite' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
