"""``rewrite()``: the one entry point the CLI and library users share.

It runs the stages of ``dsrewrite.stages`` top to bottom on one
:class:`~dsrewrite.context.RewriteContext`; the options are
:class:`~dsrewrite.options.RewriteOptions`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import onnx

from . import stages
from .context import RewriteContext
from .options import RewriteOptions
from .plan import plan_document
from .report import Report
from .verify import VerificationResult

__all__ = ["RewriteOptions", "RewriteResult", "rewrite"]


@dataclass
class RewriteResult:
    model: onnx.ModelProto
    report: Report
    warnings: list[str] = field(default_factory=list)  # also in the report's notes; the CLI prints them on stderr

    @property
    def verification(self) -> VerificationResult | None:
        return self.report.verification

    def plan_document(self) -> dict:
        """The per-conv decisions, to save with ``--plan-out`` and reapply with ``plan=``."""
        return plan_document(self.report.layers, {"input": self.report.model.get("input")})

    @property
    def ok(self) -> bool:
        """False only when verification ran and failed (a tolerance broken, or the rewritten model broken)."""
        v = self.report.verification
        return v is None or not v.ran or v.passed is not False


def rewrite(model: onnx.ModelProto | str | os.PathLike, options: RewriteOptions | None = None, **keywords) -> RewriteResult:
    """Rewrite every eligible Conv of ``model`` and verify the result.

    ``model`` is a path or an ``onnx.ModelProto`` (never modified). Options are
    given as a :class:`RewriteOptions` or as flat keywords, e.g. ``rewrite("m.onnx", rank=1)``.
    """
    if options is None:
        options = RewriteOptions.of(**keywords)
    elif keywords:
        raise TypeError("pass either options or keyword arguments, not both")
    options.validate()

    ctx = RewriteContext.open(model, options)  # load, check, analyse shapes, open calibration data
    preparing, finishing = stages.split_passes(ctx)
    stages.prepare(ctx, preparing)  # e.g. fold_batchnorm
    plans = stages.analyse(ctx)  # one LayerPlan per conv: costs, eligibility, error curve
    sweep = stages.measure_and_decide(ctx, plans)  # a rank and form (or a reason) per conv
    stages.check_in_model(ctx, plans)  # latency-aware: revert what does not pay inside the whole model
    fitted = stages.fit(ctx, plans)  # factors fitted to calibration data
    fitted = stages.guard_outputs(ctx, plans, fitted)  # all rewrites at once within --max-output-error (INT8: INT8's own)
    rewritten = stages.emit(ctx, plans, fitted, finishing)  # decompose_conv emits the plans, then e.g. cleanup
    rewritten = stages.finetune(ctx, rewritten)  # --finetune-seconds/-steps: the new factors distilled (extra)
    rewritten = stages.guard_finetuned(ctx, plans, fitted, rewritten, finishing)  # the guard, on trained factors
    rewritten = stages.deploy(ctx, rewritten)  # --quantize int8
    stages.explain(ctx, plans)
    verification = stages.verify_outputs(ctx, rewritten)
    benchmark = stages.benchmark(ctx, rewritten, plans)
    report = stages.report(ctx, plans, verification, benchmark, sweep)
    return RewriteResult(model=rewritten, report=report, warnings=list(ctx.warnings))
