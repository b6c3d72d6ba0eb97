"""dsrewrite: rewrite ONNX convolutions into depthwise + pointwise convolutions.

>>> import dsrewrite
>>> result = dsrewrite.rewrite("model.onnx", rank=1)          # doctest: +SKIP
>>> dsrewrite.save_model(result.model, "slim.onnx")            # doctest: +SKIP
>>> result.report.totals.eligible_macs_ratio                   # doctest: +SKIP
"""

from ._version import __version__
from .api import RewriteOptions, RewriteResult, rewrite
from .errors import DsrewriteError, InputError, PassError, UsageError, VerificationError
from .model_io import load_model, save_model
from .pipeline import Pass, PassContext, PassResult, Pipeline
from .plan import LayerPlan
from .report import Report

__all__ = [
    "DsrewriteError",
    "InputError",
    "LayerPlan",
    "Pass",
    "PassContext",
    "PassError",
    "PassResult",
    "Pipeline",
    "Report",
    "RewriteOptions",
    "RewriteResult",
    "UsageError",
    "VerificationError",
    "__version__",
    "load_model",
    "rewrite",
    "save_model",
]
