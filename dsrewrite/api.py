"""``rewrite()``: the one entry point the CLI and library users share.

load → analyse shapes → run the pass pipeline (fold_batchnorm → decompose_conv
→ cleanup) → check the result → verify in onnxruntime → build the report.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping

import onnx

from ._version import __version__
from .budget import DEFAULT_MAX_ERROR
from .errors import DsrewriteError, InputError, UsageError
from .graph import collect_shapes
from .model_io import check_model, load_model, run_checker
from .calibration import CalibrationSet, capture
from . import latency, planning
from .distill import DistillOptions, calibrated_error_curves, distill
from .passes import Cleanup, DecomposeConv, DecomposeOptions, FoldBatchNorm
from .pipeline import Pipeline, default_opset, infer_shapes
from .plan import decisions_from_document, plan_document
from .report import Report, compute_totals
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
    # Decisions across layers (see planning.py).
    target_macs: float | None = None  # eligible convs keep at most this fraction of their MACs
    target_latency: float | None = None  # the model should run in at most this fraction of its time
    plan: Any = None  # a saved plan (path or dict) to reapply
    evaluate: Callable[[onnx.ModelProto], float] | None = None  # task score, higher is better
    eval_key: str = ""  # identifies `evaluate` in the sensitivity cache
    sensitivity_cache: str | os.PathLike | None = None
    sweep: bool = False
    # Latency. None: time the convs whenever dsrewrite chooses ranks itself (auto, --target-macs).
    latency_aware: bool | None = None
    benchmark: bool = False
    threads: int = 1
    latency_cache: str | os.PathLike | None = field(default_factory=lambda: latency.default_cache_path())
    progress: Callable[[str, int, int], None] | None = None

    def validate(self) -> None:
        rank = self.rank
        if isinstance(rank, bool) or not (rank in ("auto", "full") or (isinstance(rank, int) and rank >= 1)):
            raise UsageError(f"--rank must be a positive integer, 'full' or 'auto', not {rank!r}")
        if not (isinstance(self.max_error, (int, float)) and 0 < self.max_error < float("inf")):
            raise UsageError(f"--max-error must be a positive finite number, not {self.max_error!r}")
        for flag, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if value is not None and not (value >= 0 and value != float("inf")):
                raise UsageError(f"{flag} must be a finite number >= 0, not {value!r}")
        if self.calibration_samples is not None and (
            isinstance(self.calibration_samples, bool) or not isinstance(self.calibration_samples, int) or self.calibration_samples < 1
        ):
            raise UsageError(f"--calibration-samples must be a positive integer, not {self.calibration_samples!r}")
        if self.target_macs is not None and not (
            isinstance(self.target_macs, (int, float)) and not isinstance(self.target_macs, bool) and 0 < self.target_macs <= 1
        ):
            raise UsageError(f"--target-macs must be in (0, 1], not {self.target_macs!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise UsageError(f"--threads must be a positive integer, not {self.threads!r}")
        if self.target_latency is not None and not (
            isinstance(self.target_latency, (int, float)) and not isinstance(self.target_latency, bool) and 0 < self.target_latency <= 1
        ):
            raise UsageError(f"--target-latency must be in (0, 1], not {self.target_latency!r}")
        if self.target_latency is not None and (self.target_macs is not None or self.plan is not None):
            raise UsageError("--target-latency cannot be combined with --target-macs or --plan")
        if self.target_macs is not None and self.plan is not None:
            raise UsageError("--target-macs and --plan cannot be combined: a plan already fixes every rank")
        for name, dims in self.input_shapes.items():
            if not dims or any((not isinstance(d, int)) or d < 1 for d in dims):
                raise UsageError(f"--input-shape {name}: dims must be positive integers, got {list(dims)}")

    def uses_latency(self) -> bool:
        if self.latency_aware is not None:
            return self.latency_aware
        return self.plan is None and (self.rank == "auto" or self.target_macs is not None or self.target_latency is not None)

    def tolerances(self) -> tuple[float | None, float | None]:
        """The tolerances verification applies: the given ones, else the full-rank defaults."""
        if self.atol is None and self.rtol is None and self.rank == "full":
            return FULL_RANK_ATOL, FULL_RANK_RTOL
        return self.atol, self.rtol

    def to_settings(self) -> dict[str, Any]:
        settings = asdict(replace(self, calibration=None, progress=None, evaluate=None, plan=None))
        settings["distill"] = asdict(self.distill) if self.distill else None
        settings["plan"] = str(self.plan) if isinstance(self.plan, (str, os.PathLike)) else (
            None if self.plan is None else "<plan>"
        )
        settings["evaluate"] = None if self.evaluate is None else (self.eval_key or "<callable>")
        settings["latency_aware"] = self.uses_latency()
        settings["latency_cache"] = None if self.latency_cache is None else str(self.latency_cache)
        settings["sensitivity_cache"] = None if self.sensitivity_cache is None else str(self.sensitivity_cache)
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

    def plan_document(self) -> dict:
        """The per-conv decisions, to save with ``--plan-out`` and reapply with ``plan=``."""
        return plan_document(self.report.layers, {"input": self.report.model.get("input")})

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

    decisions, sweep_points, estimates, curve_plans = _decide(working, shapes, decompose, calibration, options, notes)
    if decisions is not None:
        decompose = replace(
            decompose, layer_ranks=decisions.ranks, layer_reasons=decisions.reasons, layer_forms=decisions.forms or None
        )
    measured: dict[str, tuple[float, float | None]] = {}
    if options.target_latency is not None:
        decompose, measured = _latency_budget(original, working, shapes, decompose, curve_plans, calibration, options, notes)
    elif options.uses_latency():
        decompose, measured = _apply_latency(working, shapes, decompose, curve_plans, options, notes)
    fitted = {}
    if calibration is not None and not options.dry_run:
        fit_options = options.distill or DistillOptions(sequential=options.sequential, seed=options.seed)
        fitted = distill(working, _plan(working, shapes, decompose), calibration, fit_options, options.progress)
    elif calibration is not None:
        notes.append("dry run: no fitting ran; errors are estimates")
    outcome = Pipeline([DecomposeConv(decompose, fitted=fitted), Cleanup()]).run(working, shapes=shapes)
    results = results + outcome.results
    rewritten = outcome.model
    try:
        run_checker(rewritten)  # also for models over 2 GB or with tensors left on disk
    except Exception as exc:  # a rewrite that breaks the model is our bug, never the user's
        raise DsrewriteError(f"internal error: the rewritten model fails the ONNX checker: {exc}") from exc

    layers = next((r.facts for r in results if r.pass_name == "decompose_conv"), [])
    for layer in layers:  # keep the measured error curves and latencies the decisions were made from
        if layer.output in estimates:
            layer.error_at_rank, layer.error_source = estimates[layer.output]
        if layer.output in measured:
            layer.latency_before_ms, after = measured[layer.output]
            layer.latency_after_ms = after if layer.rewritten else None
    if options.rank == "auto" and options.target_macs is None and options.plan is None and any(
        layer.eligible for layer in layers
    ) and not any(layer.rewritten for layer in layers):
        source = "calibration data" if calibration is not None else "the weights alone (white-input estimate)"
        notes.append(
            f"--rank auto found no conv that saves MACs within --max-error {options.max_error:g}, judged from {source}; "
            "pretrained kernels have flat spectra: give --calibration data, a larger --max-error, --target-macs or --rank"
        )
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
            feeds, label = [_one_feed(original, None, options)], f"random (seed {options.seed})"
        verification = verify(original, rewritten, feeds, atol=atol, rtol=rtol, inputs_label=label)

    benchmark = None
    if options.benchmark and not options.dry_run:
        benchmark = _benchmark(original, rewritten, layers, calibration, options)

    report = Report(
        benchmark=benchmark,
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
        sweep=sweep_points,
    )
    return RewriteResult(model=original if options.dry_run else rewritten, report=report)


def _plan(working, shapes, decompose: DecomposeOptions) -> list:
    """The per-conv plan ``decompose`` would produce, without touching the model."""
    planned = Pipeline([DecomposeConv(replace(decompose, apply=False))]).run(working, shapes=shapes)
    return planned.results[0].facts


def _decide(working, shapes, decompose, calibration, options: RewriteOptions, notes: list[str]):
    """Decisions that need the whole plan first: saved plan, MAC budget, calibrated auto, sweep.

    Returns (decisions or None, sweep points or None, {output: (error curve, source)}, the plans with
    their error curves or None).
    """
    needs_errors = options.target_macs is not None or options.target_latency is not None or options.sweep or options.evaluate is not None or (
        options.rank == "auto" and calibration is not None
    )
    if options.plan is None and not needs_errors:
        return None, None, {}, None
    plans = _plan(working, shapes, decompose)
    if options.plan is not None:
        ranks, reasons, forms = _load_plan(options.plan)
        known = {p.output for p in plans}
        unknown = sorted(set(ranks) - known)
        if unknown:
            notes.append(f"the plan names {len(unknown)} conv(s) this model does not have, e.g. {unknown[0]!r}")
        for p in plans:
            if p.output not in ranks:
                reasons[p.output] = "not in the plan"
        return planning.Decisions(ranks, reasons, forms=forms), None, {}, None
    if calibration is not None:
        calibrated_error_curves(working, plans, calibration, options.distill or DistillOptions(seed=options.seed), options.progress)
    if options.evaluate is not None:
        cache = Path(options.sensitivity_cache) if options.sensitivity_cache is not None else None
        planning.measure_sensitivity(
            working, plans, options.evaluate, cache_path=cache, cache_key=options.eval_key, progress=options.progress
        )
    estimates = {p.output: (p.error_at_rank, p.error_source) for p in plans if p.eligible}
    sweep_points = planning.sweep(plans) if options.sweep else None
    decisions = None
    if options.target_macs is not None:
        decisions = planning.budget_decisions(plans, options.target_macs)
    elif options.rank == "auto":
        decisions = planning.auto_decisions(plans, options.max_error)
    if decisions is not None:
        notes.extend(decisions.notes)
    return decisions, sweep_points, estimates, plans


def _one_feed(original, calibration, options: RewriteOptions) -> dict:
    """The first calibration feed, else seeded random inputs at the analysed shapes."""
    if calibration is not None:
        return next(iter(calibration))
    return random_feeds(original, feed_shapes(original, options.input_shapes), options.seed)


def _benchmark(original, rewritten, layers, calibration, options: RewriteOptions) -> dict:
    """Whole-model latency before and after, next to the speedup Amdahl's law predicts from MACs."""
    feed = _one_feed(original, calibration, options)
    if options.progress:
        options.progress("benchmarking", 0, 1)
    result = latency.benchmark_models(original, rewritten, feed, threads=options.threads)
    share = latency.conv_time_share(original, feed, threads=options.threads)
    totals = compute_totals(layers)
    result["conv_time_share"] = share
    result["macs_ratio"] = totals.macs_ratio
    if share is not None and totals.macs_ratio is not None:
        predicted = 1.0 / ((1.0 - share) + share * totals.macs_ratio)
        result["predicted_speedup"] = predicted
        measured = result["speedup"]
        result["speedup_vs_predicted"] = (measured - 1.0) / (predicted - 1.0) if measured and predicted > 1.0 else None
    else:
        result["predicted_speedup"] = None
        result["speedup_vs_predicted"] = None
    if options.progress:
        options.progress("benchmarking", 1, 1)
    return result


def _latency_budget(original, working, shapes, decompose, curve_plans, calibration, options, notes):
    """--target-latency: time the whole model once and every eligible conv at a ladder of ranks, then allocate."""
    cache = latency.LatencyCache(Path(options.latency_cache) if options.latency_cache else None)
    feed = _one_feed(original, calibration, options)
    (times,) = latency.interleaved_medians([latency.make_session(working, options.threads)], feed, budget_seconds=1.0)
    timings = planning.time_rank_ladders(working, curve_plans or [], shapes, cache, threads=options.threads, progress=options.progress)
    decisions = planning.latency_budget_decisions(
        curve_plans or [], timings, target=options.target_latency, model_ms=latency.Timing.of(times).median_ms
    )
    notes.extend(decisions.notes)
    forms, measured = planning.forms_and_times(decisions, timings)
    return replace(decompose, layer_ranks=decisions.ranks, layer_reasons=decisions.reasons, layer_forms=forms), measured


def _apply_latency(working, shapes, decompose, curve_plans, options: RewriteOptions, notes: list[str]):
    """Time the planned rewrites against their convs; keep the fastest form, never a slower conv.

    Under --target-macs every eligible conv is timed at its candidate ranks first,
    ranks that do not pay in time are taken out (``planning.MIN_EFFICIENCY``), and
    the MAC budget is allocated among the rest, so the target still holds.
    Otherwise only the planned rank is timed and a slower rewrite is dropped.
    """
    cache = latency.LatencyCache(Path(options.latency_cache) if options.latency_cache else None)
    if options.target_macs is not None and curve_plans is not None:
        timings = planning.time_rank_ladders(working, curve_plans, shapes, cache, threads=options.threads, progress=options.progress)
        # Allocate among the efficient ranks first, then spend what is left of the MAC budget on any faster rank.
        faster = [replace(p, error_at_rank=list(p.error_at_rank or [])) for p in curve_plans]
        planning.restrict_to_efficient_ranks(faster, timings, 0.0)
        removed = planning.restrict_to_efficient_ranks(curve_plans, timings, planning.MIN_EFFICIENCY)
        decisions = planning.budget_decisions(curve_plans, options.target_macs, fill_plans=faster)
        # The note from the first allocation is stale now.
        notes[:] = [n for n in notes if not n.startswith("--target-macs")] + decisions.notes
        forms, measured = planning.forms_and_times(decisions, timings)
        notes.append(
            f"latency-aware: {len(timings)} conv(s) timed alone in onnxruntime at their candidate ranks "
            f"({options.threads} thread(s)); {removed} rank(s) that save under "
            f"{planning.MIN_EFFICIENCY:.0%} of their MAC-predicted time were only used to fill the budget's remainder"
        )
        return replace(decompose, layer_ranks=decisions.ranks, layer_reasons=decisions.reasons, layer_forms=forms), measured

    plans = _plan(working, shapes, decompose)
    outcome = planning.check_latency(working, plans, shapes, cache, threads=options.threads, progress=options.progress)
    if outcome.slower:
        ranks = {p.output: (None if p.output in outcome.slower else p.rank) for p in plans if p.rewritten}
        reasons = {p.output: p.reason for p in plans if not p.rewritten and p.reason}
        reasons.update(outcome.slower)
        decompose = replace(decompose, layer_ranks=ranks, layer_reasons=reasons)
    if outcome.measured:
        notes.append(
            f"latency-aware: {len(outcome.measured)} conv(s) timed alone in onnxruntime ({options.threads} thread(s)); "
            "each kept rewrite is the fastest emission form and beats its original conv"
        )
    return replace(decompose, layer_forms=outcome.forms), outcome.measured


def _load_plan(plan) -> tuple[dict, dict, dict]:
    if isinstance(plan, (str, os.PathLike)):
        try:
            document = json.loads(Path(plan).read_text())
        except FileNotFoundError:
            raise InputError(f"plan file not found: {plan}") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read plan file {plan}: {' '.join(str(exc).split())[:200]}") from None
    else:
        document = plan
    try:
        return decisions_from_document(document)
    except ValueError as exc:
        raise InputError(f"invalid plan {plan if isinstance(plan, (str, os.PathLike)) else ''}: {exc}".replace("  ", " ")) from None


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
    shapes = collect_shapes(infer_shapes(analysis))
    _fill_conv_shapes_by_running(analysis, shapes)
    return shapes


def _fill_conv_shapes_by_running(analysis: onnx.ModelProto, shapes: dict) -> None:
    """Where ONNX shape inference lost a conv input's dims, read them off one onnxruntime run.

    Only when every graph input has concrete dims (from the model or --input-shape),
    so the run happens at exactly the shapes being costed.
    """
    wanted = [
        node.input[0]
        for node in analysis.graph.node
        if node.op_type == "Conv" and (shapes.get(node.input[0]) is None or None in shapes[node.input[0]])
    ]
    if not wanted:
        return
    feed_dims = {}
    initializers = {i.name for i in analysis.graph.initializer}
    for vi in analysis.graph.input:
        if vi.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim]
        if None in dims:
            return
        feed_dims[vi.name] = dims
    try:
        values, _ = next(capture(analysis, wanted, [random_feeds(analysis, feed_dims, seed=0)]))
    except Exception as exc:  # costing stays "unknown" rather than failing the rewrite
        log.info("could not run the model to find conv input shapes: %s", exc)
        return
    for name in wanted:
        shapes[name] = tuple(int(d) for d in values[name].shape)

