"""The stages of ``rewrite``, in the order it runs them; each reads and extends the RewriteContext.

prepare → analyse → (measure → decide) → check in model → fit → guard outputs → emit → fine-tune → deploy → verify → benchmark → report

The pass list is declarative (``RewriteOptions.passes``, default
``dsrewrite.passes.DEFAULT_PASSES``): the passes before ``decompose_conv``
prepare the model, ``decompose_conv`` emits what the stages decided, and the
passes after it run on the rewritten model in the same pipeline.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from . import latency
from ._version import __version__
from .context import RewriteContext, inputs_left_dynamic
from .cores import available_cores, timed_thread_counts
from .decide import ERROR_CURVES, MIN_SPEEDUP, SavedPlan, apply_decisions, choose_strategy, revert, sweep
from .heap import release_free_memory
from .measure import measure
from .pipeline import Pass, Pipeline, default_opset
from .plan import LINEAR_FIT_NOTE, LayerPlan
from .projection import ProjectedFactors
from .report import Report, compute_totals
from .report.text import speedups
from .verify import DEFAULT_DYNAMIC_DIM, VerificationResult, output_precision, verify

log = logging.getLogger(__name__)

EMISSION = "decompose_conv"


def split_passes(ctx: RewriteContext) -> tuple[list[Pass], list[Pass]]:
    """The passes that prepare the model (before ``decompose_conv``) and those that finish it (after)."""
    from .errors import UsageError  # noqa: PLC0415
    from .passes import DEFAULT_PASSES, resolve_passes  # noqa: PLC0415

    passes = resolve_passes(ctx.options.passes or DEFAULT_PASSES)
    if not ctx.options.decompose.fold_batchnorm:
        passes = [p for p in passes if p.name != "fold_batchnorm"]
    names = [p.name for p in passes]
    if names.count(EMISSION) != 1:
        raise UsageError(f"the pass list must name {EMISSION} exactly once (it has: {', '.join(names) or 'nothing'})")
    at = names.index(EMISSION)
    return passes[:at], passes[at + 1 :]


def prepare(ctx: RewriteContext, passes: Sequence[Pass]) -> None:
    """Run the preparing passes (e.g. fold_batchnorm); the result is the model every later stage reads."""
    if passes:
        outcome = Pipeline(list(passes), name="prepare").run(ctx.model, shapes=ctx.shapes)
        ctx.model = outcome.model
        ctx.preparation_results = list(outcome.results)


def analyse(ctx: RewriteContext) -> list[LayerPlan]:
    """One LayerPlan per conv of the working model, from the read-only ``analyse_convs`` pass."""
    from .passes import AnalyseConvs  # noqa: PLC0415

    decompose = ctx.options.decompose
    analysis = Pipeline([AnalyseConvs(decompose.include, decompose.exclude)])
    (result,) = analysis.inspect(ctx.model, shapes=ctx.shapes, conv_pixels=ctx.conv_pixels)
    release_free_memory()  # the SVD threads' temporaries stay in their heaps otherwise: 130 MB for VGG16
    return result.facts


def measure_and_decide(ctx: RewriteContext, plans: list[LayerPlan]) -> list[dict] | None:
    """Measure what the chosen strategy needs, decide, and write the decisions into ``plans``.

    Returns the MAC/error trade-off sweep when asked for.
    """
    options = ctx.options
    strategy = choose_strategy(options)
    needs = set(strategy.needs)
    saved_plan = isinstance(getattr(strategy, "inner", strategy), SavedPlan)
    if options.measures_error_curves() and not saved_plan:
        needs.add(ERROR_CURVES)  # asked for by the report (sweep) or the user (an evaluation)
    measured = measure(ctx, plans, frozenset(needs))
    points = sweep(plans) if options.report.sweep and not saved_plan else None
    decisions = strategy.decide(plans, measured)
    ctx.notes.extend(decisions.notes)
    apply_decisions(plans, decisions)
    return points


def check_in_model(ctx: RewriteContext, plans: list[LayerPlan], rounds: int = 3) -> None:
    """Profile the rewrite inside the whole model and revert the convs that do not pay in place.

    A conv timed alone misses what the model around it does: onnxruntime's NCHWc layout chains, Conv+activation
    and Conv+Add fusions. Both models are profiled (in the deployed precision, at ``--threads`` and at the core
    count: a rewrite must pay at ``--threads``, the rewrites together at the core count, ``_slower_in_place``;
    a loss at the core count is confirmed by timing the whole model there); each node's kernel time is attributed
    to the conv it came from (``in_model.in_model_times``). A rewrite that does not pay in place gets another
    emission form of its rank, and is reverted when none is left (or in the last round); the rounds repeat while
    something changed, since a change moves the layout around it.
    """
    from .in_model import in_model_times, timing_candidate  # noqa: PLC0415
    from .plan import valid_forms  # noqa: PLC0415
    from .quantize import timing_label  # noqa: PLC0415

    options = ctx.options
    todo = [p for p in plans if p.rewritten and p.graph == "main"]
    if options.dry_run or not options.uses_latency() or not todo:
        return
    threads, precision = options.latency.threads, options.deploy.quantize
    counts = timed_thread_counts(threads)  # --threads, then the core count when it differs
    feed = ctx.one_feed()
    original = ctx.deployed_model()
    keys = {p.output: p.output for p in todo} | {p.node: p.output for p in todo if p.node}

    def profiled(model, owners) -> dict[int, dict[str, float]]:
        return {n: in_model_times(model, latency.node_times(model, feed, threads=n), owners)[0] for n in counts}

    before = profiled(original, keys)
    where = timing_label(precision)
    reverted, attributed, reformed, tried, unconfirmed = [], set(), set(), {}, []
    for index in range(rounds):
        candidate, owners = timing_candidate(ctx, plans, "in-model check")
        after = profiled(candidate, owners)
        timed = []
        for plan in plans:
            name = plan.output
            if plan.rewritten and all(name in before[n] and name in after[n] for n in counts):
                attributed.add(name)
                timed.append(plan)
                plan.in_model_before_ms, plan.in_model_after_ms = before[threads][name], after[threads][name]
        slower = _slower_in_place(timed, before, after, threads, counts)
        # A loss at the core count is about the whole model: confirm it by timing the whole model there
        # (interleaved medians, steadier than one profile of small kernels) before reverting anything for it.
        for n in sorted({n for _plan, n in slower if n != threads}):
            speedup = latency.benchmark_models(original, candidate, feed, threads=n, budget_seconds=CONFIRM_SECONDS)["speedup"]
            if speedup is not None and speedup >= 1.0:
                slower = [(plan, m) for plan, m in slower if m != n]
                unconfirmed.append(f"{speedup:.2f}x at {n} thread(s)")
        if not slower:
            break
        for plan, n in slower:
            # Another emission form of the same rank first (same function, same MACs); revert when none is left.
            tried.setdefault(plan.output, {plan.form})
            untried = [f for f in valid_forms(plan.rank, plan.group) if f not in tried[plan.output]]
            if untried and index < rounds - 1:
                plan.form = untried[0]
                tried[plan.output].add(plan.form)
                reformed.add(plan.output)
                continue
            revert(plan, f"slower in the whole model than the original conv ({after[n][plan.output]:.3f} ms vs "
                         f"{before[n][plan.output]:.3f} ms, {where} profile at {n} thread(s))")  # fmt: skip
            reverted.append(plan)
    unattributed = len(todo) - len(attributed)
    others = [str(n) for n in counts if n != threads]
    rule = f"{' and '.join(str(n) for n in counts)} thread(s); a rewrite must pay at {threads}" + (
        f", the rewrites together at {' and '.join(others)}" if others else ""
    )
    ctx.notes.append(
        f"in-model check: {len(attributed)} of {len(todo)} rewritten conv(s) timed inside the whole model ({where} "
        f"profile, {rule}); {len(reverted)} reverted as slower in place than the "
        "original conv"
        + (f"; {len(reformed)} given another emission form after a slower first one" if reformed else "")
        + (f"; {unattributed} could not be told apart in the profile and keep their per-conv timing" if unattributed else "")
        + (
            f"; the profile at the core count showed them slower together, but the whole model timed "
            f"{', '.join(unconfirmed)} against the original, so none was reverted for it"
            if unconfirmed else ""
        )
    )


# Seconds of interleaved whole-model runs that confirm a loss the profile attributes at the core count.
CONFIRM_SECONDS = 2.0


def _slower_in_place(timed, before, after, threads: int, counts) -> list:
    """The rewrites that do not pay in place, each with the thread count it loses at.

    At ``--threads``, the count the user deploys at, every rewrite must be MIN_SPEEDUP faster than its conv. At the
    other counts (the core count) the model must not get slower, so the rewrites are judged together: while their
    summed in-place time is not MIN_SPEEDUP under the originals', the one that loses most there goes. A rewrite
    38% faster at 1 thread and 2% slower at 2 stays when the others carry it.
    """
    slower = [(p, threads) for p in timed if after[threads][p.output] * MIN_SPEEDUP > before[threads][p.output]]
    for n in counts:
        if n == threads:
            continue
        kept = [p for p in timed if all(p is not q for q, _ in slower)]
        total_before = sum(before[n][p.output] for p in kept)
        total_after = sum(after[n][p.output] for p in kept)
        losers = sorted(
            (p for p in kept if after[n][p.output] > before[n][p.output]),
            key=lambda p: after[n][p.output] - before[n][p.output], reverse=True,
        )  # fmt: skip
        for plan in losers:
            if total_after * MIN_SPEEDUP <= total_before:
                break
            slower.append((plan, n))
            total_before -= before[n][plan.output]
            total_after -= after[n][plan.output]
    return slower


def fit(ctx: RewriteContext, plans: list[LayerPlan]) -> dict:
    """Fit the decided convs' factors to the calibration data; their figures go into the plans."""
    if ctx.calibration is None:
        return {}
    if ctx.options.dry_run:
        ctx.notes.append("dry run: no fitting ran; errors are estimates")
        return {}
    for plan in plans:
        # The kept per-channel SVDs spare emission and timing candidates a second SVD of data-free factors. The
        # main graph's rewritten convs are fitted instead, and the fit is a run's memory peak (VGG16: 120 MB).
        # Timing is done by now; a conv whose fit is not used is factorised afresh at emission.
        if plan.rewritten and plan.graph == "main" and plan.analysis is not None:
            plan.analysis.spectra = None
    fitted = _fit_plans(ctx, plans)
    record_fits(plans, fitted)
    return fitted


def _fit_plans(ctx: RewriteContext, plans: Sequence[LayerPlan], **overrides) -> dict:
    """The factors of the rewritten plans, fitted as the options say (``overrides``: other DistillOptions fields)."""
    from .distill import distill  # noqa: PLC0415

    fit_options = replace(ctx.options.calibration.fit_options(ctx.options.seed), **overrides)
    return distill(ctx.model, plans, ctx.calibration, fit_options, ctx.progress)


def record_fits(plans: Sequence[LayerPlan], fitted: dict) -> None:
    """The fitted factors' figures (errors, method, activation) into the plans of the convs they rewrite."""
    for plan in plans:
        layer = fitted.get(plan.output)
        if layer is not None and plan.rewritten and layer.factors.rank == plan.rank:
            plan.weight_error = layer.weight_error
            plan.output_error = layer.output_error
            plan.output_error_data_free = layer.output_error_data_free
            plan.fit = layer.method
            plan.fit_seconds = layer.seconds
            plan.activation = layer.activation
            plan.fit_target = layer.objective
            plan.activated_error = layer.activated_error
            plan.activated_error_linear = layer.activated_error_linear
            note = layer.note if layer.objective == "after-depthwise" else f"{LINEAR_FIT_NOTE}{layer.note}"
            if layer.note and note not in plan.notes:  # the output guard may fit again
                plan.notes.append(note)


# After the output guard leaves fine-tuned convs alone, the kept ones train again for this share of the budget.
RETUNE_SHARE = 0.25


def guard_outputs(ctx: RewriteContext, plans: list[LayerPlan], fitted: dict) -> dict:
    """``--max-output-error`` (default under ``--quantize``: INT8's own error): keep the cheapest rewrites whose
    fits, all at once, move the model's outputs by at most the bound; the others are left alone. With fine-tuning
    the guard waits for the trained factors (``guard_finetuned``): they, not the fits, are what ships."""
    bound = ctx.options.decompose.max_output_error
    if bound == math.inf or ctx.calibration is None or (bound is None and ctx.options.deploy.quantize is None):
        return fitted
    if ctx.options.dry_run:
        ctx.notes.append("dry run: the output guard runs after the fit, so a real run may leave some of these rewrites alone")
        return fitted
    if not fitted:
        return fitted
    if ctx.options.finetune.enabled:
        ctx.guard_deferred = True
        return fitted
    kept, outcome = _guard(ctx, plans, fitted, trained=False)
    _record_guard(ctx, outcome)
    return kept


def guard_finetuned(
    ctx: RewriteContext, plans: list[LayerPlan], fitted: dict, rewritten: onnx.ModelProto, finishing: Sequence[Pass]
) -> onnx.ModelProto:  # fmt: skip
    """The output guard deferred past fine-tuning. It judges the trained factors, read back from the model
    (``emitted_factors``), and a trial keeps a subset of them as trained: refitting would discard the training.
    The convs it leaves alone are emitted again without their rewrite, and the kept ones, trained alongside them and
    partly making up for them, are trained again from where they are for ``RETUNE_SHARE`` of the budget and judged
    once more (what that guard leaves alone is not trained a third time). Trained factors over the bound whose fits
    are within it give way to the fits. When fine-tuning wrote nothing back, the guard runs on the fits as it would
    have before, refits included."""
    from .output_guard import FITS_KEPT  # noqa: PLC0415

    if not ctx.guard_deferred:
        return rewritten
    ctx.guard_deferred = False
    trained = bool((ctx.finetune or {}).get("written_back"))
    factors = _trained_factors(rewritten, ctx.emitted, plans, fitted) if trained else fitted
    kept, first = _guard(ctx, plans, factors, trained=trained, fallback=fitted if trained else None)
    _record_guard(ctx, first)
    if first is not None and first.factors == FITS_KEPT:  # the fits are within the bound, the trained factors not
        ctx.finetune["written_back"] = False
        ctx.notes.append("the fine-tuned weights moved the outputs further than the output guard's bound, and the "
                         "closed-form fits they started from do not: the fits are written instead")  # fmt: skip
        return emit(ctx, plans, fitted, finishing)
    if first is None or not first.reverted:
        return rewritten
    model = emit(ctx, plans, kept, finishing)
    if not trained:
        return model
    ctx.finetune["left_alone_by_output_guard"] = len(first.reverted)
    if not any(p.rewritten for p in plans):
        return model
    before = ctx.finetune
    settings = ctx.options.finetune
    short = replace(settings, seconds=None if settings.seconds is None else settings.seconds * RETUNE_SHARE,
                    steps=None if settings.steps is None else max(1, math.ceil(settings.steps * RETUNE_SHARE)))  # fmt: skip
    retuned = finetune(ctx, model, short)
    again = ctx.finetune
    if again is before:  # no second training ran
        return model
    ctx.finetune = {**before, "retrained": again}
    ctx.notes[-1] = f"trained again after the output guard left {len(first.reverted)} conv(s) alone: {ctx.notes[-1]}"
    if not again.get("written_back"):
        return model  # the kept convs as first trained, within the bound
    kept, second = _guard(ctx, plans, _trained_factors(retuned, ctx.emitted, plans, kept), trained=True)
    if second is None:  # nothing left to compare
        return retuned
    ctx.notes.append(second.note())
    first.error_kept, first.reverted = second.error_kept, first.reverted + second.reverted
    first.runs, first.seconds = first.runs + second.runs, first.seconds + second.seconds
    ctx.output_guard = first.record()
    return emit(ctx, plans, kept, finishing) if second.reverted else retuned


def _guard(ctx: RewriteContext, plans: list[LayerPlan], factors: dict, trained: bool, fallback: dict | None = None):
    """Run the output guard on ``factors``: the factors to emit and its ``GuardOutcome`` (None when it could not
    compare). A trial refits the convs it keeps, unless they are ``trained`` (``fallback``: the fits they came from,
    kept whole if they are within the bound and the trained ones are not)."""
    from .output_guard import guard  # noqa: PLC0415

    def fit_without(left_alone: set[str]) -> dict:
        if trained:
            return {key: layer for key, layer in factors.items() if key not in left_alone}
        trial = []
        for plan in plans:
            if plan.output in left_alone:
                plan = replace(plan, notes=[])
                revert(plan, "a trial of the output guard")
            trial.append(plan)
        return _fit_plans(ctx, trial) if any(p.rewritten for p in trial) else {}

    bound = ctx.options.decompose.max_output_error
    independently = None if trained else (lambda: _fit_plans(ctx, plans, sequential=False))
    guarded = guard(ctx, plans, factors, bound, fit_without, independently, trained=trained, fallback=fallback)
    if guarded is None:
        return factors, None
    outcome, kept = guarded
    if outcome.reverted and not trained:
        record_fits(plans, kept)
    return kept, outcome


def _record_guard(ctx: RewriteContext, outcome) -> None:
    """The guard's record and note into the report (nothing when it could not compare)."""
    if outcome is not None:
        ctx.output_guard = outcome.record()
        ctx.notes.append(outcome.note())


def _trained_factors(model: onnx.ModelProto, emitted: Mapping[str, Sequence[str]], plans: Sequence[LayerPlan],
                     fitted: dict) -> dict:  # fmt: skip
    """The fitted layers with the factors and biases fine-tuning left in ``model`` (by the emitted nodes)."""
    from .passes.decompose_conv import emitted_factors  # noqa: PLC0415

    nodes = {node.name: node for node in model.graph.node}
    tensors = {t.name: t for t in model.graph.initializer}
    forms = {p.output: p.form for p in plans if p.rewritten}
    trained = {}
    for key, layer in fitted.items():
        names = emitted.get(key)
        if key not in forms or not names or any(name not in nodes for name in names):
            trained[key] = layer
            continue
        chain = [nodes[name] for name in names]
        read = {name: numpy_helper.to_array(tensors[name]) for node in chain for name in node.input[1:3] if name in tensors}
        factors, bias = emitted_factors(chain, read, forms[key])
        bias = np.zeros(len(layer.bias)) if bias is None else bias
        if isinstance(factors, ProjectedFactors):
            trained[key] = replace(layer, factors=factors.separable(), projected=factors, bias=bias)
        else:
            trained[key] = replace(layer, factors=factors, bias=bias)
    return trained


def emit(ctx: RewriteContext, plans: list[LayerPlan], fitted: dict, finishing: Sequence[Pass]) -> onnx.ModelProto:
    """Emit exactly the plans (``decompose_conv``), then the finishing passes; a dry run emits nothing."""
    from .passes import DecomposeConv  # noqa: PLC0415

    if ctx.options.dry_run:
        return ctx.original
    emission = DecomposeConv(plans=plans, fitted=fitted)
    outcome = Pipeline([emission, *finishing], name="emit").run(ctx.model, shapes=ctx.shapes)
    ctx.emission_results = list(outcome.results)  # emitted again after the output guard: these replace the first
    ctx.emitted = emission.emitted  # which nodes hold each conv's new weights (fine-tuning trains them)
    return outcome.model


def finetune(ctx: RewriteContext, rewritten: onnx.ModelProto, settings=None) -> onnx.ModelProto:
    """Distil the new factors against the original model (optional extra); the trained weights are written back
    by initializer name, so the deploy, verify, benchmark and report stages all see the fine-tuned model.
    ``settings``: other than the options' (a shorter budget for the retraining after the output guard)."""
    settings = settings or ctx.options.finetune
    if not settings.enabled or ctx.options.dry_run or ctx.calibration is None:
        return rewritten
    from .finetune import run_finetune  # noqa: PLC0415

    model, summary, note = run_finetune(ctx.model, rewritten, ctx.emitted, list(ctx.calibration), settings,
                                        ctx.options.seed, ctx.progress)  # fmt: skip
    ctx.finetune = summary
    ctx.notes.append(note)
    return model


def deploy(ctx: RewriteContext, rewritten: onnx.ModelProto) -> onnx.ModelProto:
    """The model in the precision it will run in: ``--quantize int8`` quantizes it on the calibration data."""
    from .quantize import quantize_int8  # noqa: PLC0415

    target = ctx.options.deploy.quantize
    if target is None or ctx.options.dry_run:
        return rewritten
    if ctx.progress:
        ctx.progress("quantizing", 0, 1)
    deployed = quantize_int8(rewritten, ctx.calibration)
    ctx.notes.append(
        f"quantized to {target.upper()} (QDQ, per-channel weights) with onnxruntime.quantization on "
        f"{len(ctx.calibration)} calibration sample(s); rewrite decisions were timed in {target.upper()}; "
        "verification compares it with the float original"
    )
    if ctx.progress:
        ctx.progress("quantizing", 1, 1)
    return deployed


# A quantized model that changes more decisions than this, or whose outputs point elsewhere, gets a warning.
MIN_AGREEMENT, MIN_COSINE = 0.95, 0.98


def fidelity_warnings(verification: VerificationResult | None, options) -> list[str]:
    """With ``--quantize``: one line per output the delivered model moved too far from the float original."""
    if options.deploy.quantize is None or verification is None or not verification.ran:
        return []
    warnings = []
    for output in verification.outputs:
        agreement = output.argmax_agreement
        if (agreement is not None and agreement < MIN_AGREEMENT) or output.cosine < MIN_COSINE:
            shown = f"argmax agreement {agreement:.3f}, " if agreement is not None else ""
            warnings.append(
                f"the {options.deploy.quantize.upper()} model moved output '{output.name}' away from the float original "
                f"({shown}cosine {output.cosine:.3f}): check its accuracy before shipping; static quantization does not "
                "suit every model"
            )
    return warnings


def explain(ctx: RewriteContext, plans: list[LayerPlan]) -> None:
    """Notes that tell the user why the result looks the way it does."""
    options = ctx.options
    d = options.decompose
    timed = any(p.latency_before_ms is not None or p.in_model_before_ms is not None for p in plans)
    if d.rank == "auto" and d.target_macs is None and d.plan is None and any(p.eligible for p in plans) and not any(
        p.rewritten for p in plans
    ) and not timed:  # when convs were timed, the latency notes say why they stay
        source = "calibration data" if ctx.calibration is not None else "the weights alone (white-input estimate)"
        ctx.notes.append(
            f"--rank auto found no conv that saves MACs within --max-error {d.max_error:g}, judged from {source}; "
            "pretrained kernels have flat spectra: give --calibration data, a larger --max-error, --target-macs or --rank"
        )
    if not plans:
        ctx.notes.append("nothing to rewrite: the model has no Conv nodes")
    elif any(p.macs_before is None and p.op == "Conv" for p in plans):  # quantized convs are not costed at all
        ctx.notes.append("MACs of some convs are unknown (dynamic spatial dims); pass --input-shape to fix them")


def verify_outputs(ctx: RewriteContext, rewritten: onnx.ModelProto) -> VerificationResult | None:
    """Run both models in onnxruntime on the calibration feeds (else seeded random inputs) and compare."""
    if not ctx.options.verify.enabled or ctx.options.dry_run:
        return None
    atol, rtol = ctx.options.tolerances(output_precision(ctx.original))
    if ctx.calibration is not None:
        feeds, label = ctx.calibration, ctx.calibration.label
    else:
        feeds, label = [ctx.one_feed()], f"random (seed {ctx.options.seed})"
    result = verify(ctx.original, rewritten, feeds, atol=atol, rtol=rtol, inputs_label=label)
    ctx.warn(fidelity_warnings(result, ctx.options))
    return result


def benchmark(ctx: RewriteContext, rewritten: onnx.ModelProto, plans: list[LayerPlan]) -> dict | None:
    """Whole-model latency before and after, next to the speedup Amdahl's law predicts from MACs.

    Timed at ``--threads`` and, when the machine has more cores, at all of them: the model must not get slower at
    either.
    With ``--quantize`` the model without any conv rewritten (after the preparing passes, e.g. BatchNorm folded)
    is quantized alike and timed in the same rounds: what the rewrite adds over INT8 alone.
    """
    options = ctx.options
    if not options.latency.benchmark or options.dry_run:
        return None
    feed = ctx.one_feed()
    threads = options.latency.threads
    cores = available_cores()
    steps = 3 if cores != threads else 2
    if ctx.progress:
        ctx.progress("benchmarking", 0, steps)
    totals = compute_totals(plans)
    references = {}
    if options.deploy.quantize is not None and totals.rewritten:  # INT8 alone: prepared and quantized alike
        references[f"{options.deploy.quantize}_without_rewrite"] = ctx.deployed_model()
    elif options.deploy.quantize is not None:  # it is the model written: timing it against itself measures noise
        alone = options.deploy.quantize.upper()
        share = latency.conv_time_share(rewritten, feed, threads=threads)
        limit = latency.amdahl(share, 0.0)
        ceiling = (f"; its conv kernels take {share:.0%} of its run time (profiler): even at zero time they would "
                   f"make it only {limit:.2f}x faster" if limit is not None else "")  # fmt: skip
        ctx.notes.append(f"no conv rewritten: the model written is {alone} alone (prepared and quantized the same "
                         f"way), so it is not timed against itself{ceiling}")  # fmt: skip
    result = latency.benchmark_models(ctx.original, rewritten, feed, threads=threads, references=references)
    result["rewritten_convs"] = totals.rewritten
    result["input_shapes"] = {name: list(value.shape) for name, value in feed.items()}
    guessed = guessed_input_dims(ctx, result["input_shapes"])
    if guessed:
        ctx.notes.append(
            f"latency measured at {guessed}: the model leaves those dims dynamic and neither --input-shape nor "
            f"--calibration gave them, so they were set to {DEFAULT_DYNAMIC_DIM}; the speedup depends on them"
        )
    if ctx.progress:
        ctx.progress("benchmarking", 1, steps)
    if cores != threads:
        more = latency.benchmark_models(ctx.original, rewritten, feed, threads=cores, references=references)
        for key in ("latency_before_ms", "latency_after_ms", "speedup", *(f"speedup_vs_{label}" for label in references)):
            result[f"{key}_{cores}_threads"] = more[key]
        if ctx.progress:
            ctx.progress("benchmarking", 2, steps)
    share = latency.conv_time_share(ctx.original, feed, threads=threads)
    result["conv_time_share"] = share
    for label, model in references.items():  # e.g. INT8 alone: how much of its time a conv rewrite can touch at all
        ref_share = latency.conv_time_share(model, feed, threads=threads)
        result[f"conv_time_share_{label}"] = ref_share
        result[f"ceiling_vs_{label}"] = latency.amdahl(ref_share, 0.0)
        result[f"predicted_speedup_vs_{label}"] = latency.amdahl(ref_share, totals.macs_ratio)
    result["macs_ratio"] = totals.macs_ratio
    predicted = result["predicted_speedup"] = latency.amdahl(share, totals.macs_ratio)
    measured = result["speedup"]
    result["speedup_vs_predicted"] = (
        (measured - 1.0) / (predicted - 1.0) if predicted is not None and measured and predicted > 1.0 else None
    )
    if ctx.progress:
        ctx.progress("benchmarking", steps, steps)
    ctx.warn(slowness_warnings(result, options))
    return result


def guessed_input_dims(ctx: RewriteContext, timed: Mapping[str, Sequence[int]]) -> str:
    """The graph inputs whose non-batch dims are dynamic and were given neither by --input-shape nor by calibration
    feeds, at the shapes ``timed`` gave them, as 'name 1x3x64x64' (empty when there are none)."""
    if ctx.calibration is not None:
        return ""
    left = inputs_left_dynamic(ctx.original, ctx.options.input_shapes)
    return ", ".join(f"{name} {'x'.join(map(str, timed[name]))}" for name in left if name in timed)


def slowness_warnings(bench: dict, options) -> list[str]:
    """One line for every measured setting in which the rewritten model is slower than what it replaces."""
    warnings = []
    for _key, value, reference, count in speedups(bench):
        if value >= latency.SLOWER_BELOW:
            continue
        versus = (reference or "original").replace("_", " ")
        threads = int(count or bench.get("threads") or options.latency.threads)
        warnings.append(
            f"the rewritten model is slower than the {versus} in onnxruntime ({value:.2f}x at {threads} thread(s)); "
            + _slowness_hint(threads, options, bench, versus)
        )
    return warnings


def _slowness_hint(threads: int, options, bench: dict | None = None, versus: str = "original") -> str:
    quantize = options.deploy.quantize
    nothing_rewritten = bench is not None and bench.get("rewritten_convs") == 0
    if quantize is not None and versus == "original" and bench is not None:
        alone = bench.get(f"speedup_vs_{quantize}_without_rewrite" + ("" if threads == bench.get("threads") else f"_{threads}_threads"))
        if nothing_rewritten or (alone is not None and alone >= latency.SLOWER_BELOW):
            return f"{quantize.upper()} itself is slower than float32 for this model here: consider shipping float32 (no --quantize)"
    if nothing_rewritten:
        return "no conv was rewritten: the difference is the other passes (e.g. BatchNorm folding) or the machine's load"
    if not options.uses_latency():
        return "try --latency-aware: it times each rewrite against its conv and keeps only those that pay"
    if threads != options.latency.threads:
        return f"the rewrites were timed at {options.latency.threads} thread(s): to deploy at {threads}, pass --threads {threads}"
    if options.decompose.picks_ranks():
        return "the convs were faster alone but not in the whole model; try a larger --target-macs or --target-latency"
    return "the convs were faster alone but not in the whole model; try a lower --rank or --rank auto"


def report(ctx, plans, verification, bench, sweep_points) -> Report:
    original = ctx.original
    return Report(
        benchmark=bench,
        model={
            "input": ctx.source,
            "output": None,
            "opset": default_opset(original),
            "ir_version": original.ir_version,
            "producer": original.producer_name,
            "dsrewrite_version": __version__,
        },
        settings=ctx.options.to_settings(output_precision(original)),
        layers=list(plans),
        verification=verification,
        passes=[
            {
                "name": r.pass_name,
                "changes": len(r.changes),
                "skips": [{"node": s.node, "reason": s.reason} for s in r.skips],
                "seconds": round(r.seconds, 4),
            }
            for r in ctx.results
        ],
        notes=ctx.notes,
        sweep=sweep_points,
        finetune=ctx.finetune,
        output_guard=ctx.output_guard,
    )
