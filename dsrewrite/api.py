"""``rewrite()``: the one entry point the CLI and library users share.

load → analyse shapes → run the pass pipeline (fold_batchnorm → decompose_conv
→ cleanup) → check the result → verify in onnxruntime → build the report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping

import onnx

from ._version import __version__
from .budget import DEFAULT_MAX_ERROR
from .errors import DsrewriteError, UsageError
from .graph import collect_shapes
from .model_io import check_model, load_model
from .calibration import CalibrationSet
from .distill import DistillOptions, distill
from .passes import Cleanup, DecomposeConv, DecomposeOptions, FoldBatchNorm
from .pipeline import Pipeline, default_opset, infer_shapes
from .report import Report
from .verify import FULL_RANK_ATOL, FULL_RANK_RTOL, VerificationResult, feed_shapes, random_feeds, verify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewriteOptions:
    """Everything ``rewrite`` can be told. Keyword-only, validated by :meth:`validate`."""

    rank: int | str = "auto"
    max_error: float = DEFAULT_MAX_ERROR
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    fold_batchnorm: bool = True
    verify: bool = True
    atol: float | None = None
    rtol: float | None = None
    seed: int = 0
    dry_run: bool = False
    # Calibration: an .npz path, a directory of .npz feeds, or an iterable of {input: array} dicts.
    calibration: Any = None
    calibration_samples: int | None = None
    sequential: bool = True
    distill: DistillOptions | None = None  # fine control of the fit; overrides `sequential` and `seed`
    progress: Callable[[str, int, int], None] | None = None

    def validate(self) -> None:
        rank = self.rank
        if isinstance(rank, bool) or not (rank in ("auto", "full") or (isinstance(rank, int) and rank >= 1)):
            raise UsageError(f"--rank must be a positive integer, 'full' or 'auto', not {rank!r}")
        if not (isinstance(self.max_error, (int, float)) and self.max_error > 0 and self.max_error == self.max_error):
            raise UsageError(f"--max-error must be a positive number, not {self.max_error!r}")
        for flag, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if value is not None and not (value >= 0 and value != float("inf")):
                raise UsageError(f"{flag} must be a finite number >= 0, not {value!r}")
        if self.calibration_samples is not None and (
            isinstance(self.calibration_samples, bool) or not isinstance(self.calibration_samples, int) or self.calibration_samples < 1
        ):
            raise UsageError(f"--calibration-samples must be a positive integer, not {self.calibration_samples!r}")
        for name, dims in self.input_shapes.items():
            if not dims or any((not isinstance(d, int)) or d < 1 for d in dims):
                raise UsageError(f"--input-shape {name}: dims must be positive integers, got {list(dims)}")

    def tolerances(self) -> tuple[float | None, float | None]:
        """The tolerances verification applies: the given ones, else the full-rank defaults."""
        if self.atol is None and self.rtol is None and self.rank == "full":
            return FULL_RANK_ATOL, FULL_RANK_RTOL
        return self.atol, self.rtol

    def to_settings(self) -> dict[str, Any]:
        settings = asdict(replace(self, calibration=None, progress=None))
        settings["distill"] = asdict(self.distill) if self.distill else None
        settings["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        settings["include"] = list(self.include)
        settings["exclude"] = list(self.exclude)
        settings["atol"], settings["rtol"] = self.tolerances()
        calibration = self.calibration
        settings["calibration"] = str(calibration) if isinstance(calibration, (str, os.PathLike)) else (
            None if calibration is None else "<feeds>"
        )
        settings.pop("progress", None)
        return settings


@dataclass
class RewriteResult:
    model: onnx.ModelProto
    report: Report

    @property
    def verification(self) -> VerificationResult | None:
        return self.report.verification

    @property
    def ok(self) -> bool:
        """False only when verification ran and failed."""
        v = self.report.verification
        return v is None or not v.ran or bool(v.passed)


def rewrite(model: onnx.ModelProto | str | os.PathLike, options: RewriteOptions | None = None, **kwargs) -> RewriteResult:
    """Rewrite every eligible Conv of ``model`` and verify the result.

    ``model`` is a path or an ``onnx.ModelProto`` (never modified). Options are
    given as a :class:`RewriteOptions` or as keywords, e.g. ``rewrite("m.onnx", rank=1)``.
    """
    if options is None:
        options = RewriteOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either options or keyword arguments, not both")
    options.validate()

    if isinstance(model, (str, os.PathLike)):
        source = str(model)
        original = load_model(model)
    elif isinstance(model, onnx.ModelProto):
        source = "<ModelProto>"
        check_model(model)
        original = model
    else:
        raise UsageError(f"model must be a path or an onnx.ModelProto, not {type(model).__name__}")

    notes: list[str] = []
    shapes = _analysis_shapes(original, options.input_shapes, notes)
    calibration = None
    if options.calibration is not None:
        calibration = CalibrationSet(options.calibration, original, limit=options.calibration_samples)
    decompose = DecomposeOptions(
        rank=options.rank,
        max_error=options.max_error,
        include=tuple(options.include),
        exclude=tuple(options.exclude),
        apply=not options.dry_run,
    )

    results = []
    working = original
    if options.fold_batchnorm:
        folded = Pipeline([FoldBatchNorm()]).run(working, shapes=shapes)
        working, results = folded.model, folded.results
    fitted = {}
    if calibration is not None and not options.dry_run:
        planned = Pipeline([DecomposeConv(replace(decompose, apply=False))]).run(working, shapes=shapes)
        plans = planned.results[0].facts
        fit_options = options.distill or DistillOptions(sequential=options.sequential, seed=options.seed)
        fitted = distill(working, plans, calibration, fit_options, options.progress)
    elif calibration is not None:
        notes.append("dry run: calibration data was validated but no fitting ran")
    outcome = Pipeline([DecomposeConv(decompose, fitted=fitted), Cleanup()]).run(working, shapes=shapes)
    results = results + outcome.results
    rewritten = outcome.model
    try:
        onnx.checker.check_model(rewritten)
    except Exception as exc:  # a rewrite that breaks the model is our bug, never the user's
        raise DsrewriteError(f"internal error: the rewritten model fails the ONNX checker: {exc}") from exc

    layers = next((r.facts for r in results if r.pass_name == "decompose_conv"), [])
    if not layers:
        notes.append("nothing to rewrite: the model has no Conv nodes")
    elif any(layer.macs_before is None for layer in layers):
        notes.append("MACs of some convs are unknown (dynamic spatial dims); pass --input-shape to fix them")

    verification = None
    if options.verify and not options.dry_run:
        atol, rtol = options.tolerances()
        if calibration is not None:
            feeds, label = calibration, calibration.label
        else:
            feeds = [random_feeds(original, feed_shapes(original, options.input_shapes), options.seed)]
            label = f"random (seed {options.seed})"
        verification = verify(original, rewritten, feeds, atol=atol, rtol=rtol, inputs_label=label)

    report = Report(
        model={
            "input": source,
            "output": None,
            "opset": default_opset(original),
            "ir_version": original.ir_version,
            "producer": original.producer_name,
            "dsrewrite_version": __version__,
        },
        settings=options.to_settings(),
        layers=list(layers),
        verification=verification,
        passes=[
            {
                "name": r.pass_name,
                "changes": len(r.changes),
                "skips": [{"node": s.node, "reason": s.reason} for s in r.skips],
                "seconds": round(r.seconds, 4),
            }
            for r in results
        ],
        notes=notes,
    )
    return RewriteResult(model=original if options.dry_run else rewritten, report=report)


def _analysis_shapes(model: onnx.ModelProto, overrides: Mapping[str, tuple[int, ...]], notes: list[str]):
    """Shapes for costing: user overrides, batch dim 1 where unknown ("per sample"), inferred elsewhere."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in initializers}
    for name, dims in overrides.items():
        if name not in inputs:
            known = ", ".join(inputs) or "none"
            raise UsageError(f"--input-shape names unknown input '{name}' (model inputs: {known})")
        rank = len(inputs[name].type.tensor_type.shape.dim)
        if rank and rank != len(dims):
            raise UsageError(f"--input-shape {name}: model input has rank {rank}, got {len(dims)} dims")
    analysis = onnx.ModelProto()
    analysis.CopyFrom(model)
    per_sample = []
    for vi in analysis.graph.input:
        if vi.name not in inputs:
            continue
        dims = vi.type.tensor_type.shape.dim
        if vi.name in overrides:
            for d, value in zip(dims, overrides[vi.name]):
                d.Clear()
                d.dim_value = value
        elif dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            dims[0].Clear()
            dims[0].dim_value = 1
            per_sample.append(vi.name)
    if per_sample:
        notes.append(f"batch dim of {', '.join(per_sample)} is dynamic: MACs are per sample (batch 1)")
    return collect_shapes(infer_shapes(analysis))

