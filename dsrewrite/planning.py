"""Per-conv rank decisions made across layers: MAC budgets, calibrated ``auto``, saved plans, sensitivity.

``decompose_conv`` alone decides each conv in isolation (a uniform rank, or the
data-free ``auto`` rule). Everything here needs the whole plan first, then
hands ``decompose_conv`` one decision per conv (``DecomposeOptions.layer_ranks``).

Error estimates per conv and rank (``LayerPlan.error_at_rank``, an NMSE) come
from, in increasing order of cost and faithfulness:

* the kernel spectrum (always; exact for white inputs),
* calibration data (``distill.calibrated_error_curves``: each conv fitted alone),
* a task metric (:func:`measure_sensitivity`: the model scored with only that
  conv rewritten at that rank; the error is the score drop).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import lowrank
from .budget import allocate, curves_from_plans, smallest_rank_within
from .cost import separable_cost
from .graph import NameAllocator, constant_value
from .cache import cache_path as user_cache_path
from .cache import read_json, write_json
from .pipeline import export_model
from .plan import LayerPlan

log = logging.getLogger(__name__)

Evaluate = Callable[[onnx.ModelProto], float]
SWEEP_TARGETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class Decisions:
    ranks: dict[str, int | None]
    reasons: dict[str, str]
    notes: list[str] = field(default_factory=list)
    forms: dict[str, str] = field(default_factory=dict)  # emission form per conv, when already decided


def budget_decisions(plans: Sequence[LayerPlan], target: float, fill_plans: Sequence[LayerPlan] | None = None) -> Decisions:
    """``--target-macs``: allocate ranks so the eligible convs keep at most ``target`` of their MACs.

    ``fill_plans`` (copies of ``plans`` with more ranks allowed) are used to spend what the
    first allocation left of the budget (see :func:`~dsrewrite.budget.allocate`).
    """
    curves, absolute = curves_from_plans(plans)
    fill = curves_from_plans(fill_plans)[0] if fill_plans is not None else None
    if fill is not None and [c.key for c in fill] != [c.key for c in curves]:
        fill = None
    allocation = allocate(curves, target, fill)
    reasons = {key: "left unrewritten by the MAC budget: cheaper error elsewhere" for key, r in allocation.ranks.items() if r is None}
    notes = [
        f"--target-macs {target:g}: eligible MACs {allocation.ratio:.3f} of the original "
        f"(estimated total NMSE {allocation.estimated_error:.4g}, errors from {_sources(plans)})"
    ]
    if not absolute:
        notes.append("MAC budget allocated per output pixel: some spatial dims are unknown")
    if curves and allocation.ratio < target * 0.98:
        notes.append(f"the budget could not be met within 2%: ranks are discrete (closest: {allocation.ratio:.3f})")
    if curves and allocation.ratio > target * (1 + 1e-9):
        notes.append(f"the budget cannot be met even at rank 1 everywhere (best: {allocation.ratio:.3f})")
    return Decisions(allocation.ranks, reasons, notes)


def auto_decisions(plans: Sequence[LayerPlan], max_error: float) -> Decisions:
    """``--rank auto`` with measured errors: the cheapest rank whose relative error is within ``max_error``."""
    curves, _ = curves_from_plans(plans)
    ranks, reasons = {}, {}
    for curve in curves:
        rank = smallest_rank_within(curve, max_error)
        ranks[curve.key] = rank
        if rank is None:
            reasons[curve.key] = f"no rank that saves MACs keeps the measured error <= {max_error:g}"
    return Decisions(ranks, reasons)


def sweep(plans: Sequence[LayerPlan], targets: Sequence[float] = SWEEP_TARGETS) -> list[dict]:
    """The trade-off curve: for each MAC target, the allocation's eligible-MAC ratio and estimated error."""
    curves, _ = curves_from_plans(plans)
    points = []
    for target in targets:
        allocation = allocate(curves, target)
        points.append(
            {
                "target": target,
                "eligible_macs_ratio": allocation.ratio,
                "estimated_error": allocation.estimated_error,
                "ranks": allocation.ranks,
            }
        )
    return points


def _sources(plans: Sequence[LayerPlan]) -> str:
    return ", ".join(sorted({p.error_source for p in plans if p.eligible and p.error_source})) or "none"


# -- accuracy in the loop -----------------------------------------------------------------------


def candidate_ranks(plan: LayerPlan, limit: int = 6) -> list[int]:
    """Up to ``limit`` ranks that save MACs: every rank up to ``limit``, then 12, 16, 24, 32, 48, 64."""
    saving = [
        r
        for r, e in enumerate(plan.error_at_rank or [], start=1)
        if math.isfinite(e) and _separable_macs(plan, r) < plan.macs_per_pixel_before
    ]
    ladder = [r for r in saving if r <= limit or r in (12, 16, 24, 32, 48, 64)]
    return ladder[:limit]


def measure_sensitivity(
    model: onnx.ModelProto,
    plans: Sequence[LayerPlan],
    evaluate: Evaluate,
    *,
    cache_path: Path | None = None,
    cache_key: str = "",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Score the model with one conv at a time rewritten (data-free factors) at a few ranks.

    Sets each eligible conv's ``error_at_rank`` to the score drop (plus a
    vanishing share of its previous estimate, to break ties), ``inf`` for ranks
    not scored. Returns the table ``{"baseline": score, "layers": {output: {rank: score}}}``,
    cached on disk at ``cache_path`` under a key of the model bytes and ``cache_key``.
    """
    fingerprint = hashlib.sha256(model.SerializeToString(deterministic=True) + cache_key.encode()).hexdigest()
    cache = read_json(cache_path)
    table = cache.get(fingerprint) or {"baseline": None, "layers": {}}
    if table["baseline"] is None:
        table["baseline"] = float(evaluate(model))
    graph = gs.import_onnx(model)
    nodes = {n.outputs[0].name: n for n in graph.nodes if n.op == "Conv" and n.outputs}
    jobs = [(p, r) for p in plans if p.eligible and p.output in nodes for r in candidate_ranks(p)]
    for index, (plan, rank) in enumerate(jobs):
        scores = table["layers"].setdefault(plan.output, {})
        if str(rank) not in scores:
            scores[str(rank)] = float(evaluate(_with_one_conv_factorised(model, plan.output, rank)))
            write_json(cache_path, {**cache, fingerprint: table})
        if progress:
            progress("measuring sensitivity", index + 1, len(jobs))
    baseline = table["baseline"]
    for plan in plans:
        scores = table["layers"].get(plan.output)
        if not plan.eligible or not scores:
            continue
        previous = plan.error_at_rank or []
        errors = [float("inf")] * len(previous)
        for rank_text, score in scores.items():
            r = int(rank_text)
            if r <= len(errors):
                errors[r - 1] = max(baseline - score, 0.0) + 1e-6 * previous[r - 1]
        plan.error_at_rank = errors
        plan.error_source = "evaluation"
    return table


def _with_one_conv_factorised(model: onnx.ModelProto, output: str, rank: int) -> onnx.ModelProto:
    """The model with one conv's kernel replaced by its rank-``rank`` data-free reconstruction."""
    graph = gs.import_onnx(model)
    names = NameAllocator(graph)
    node = next(n for n in graph.nodes if n.op == "Conv" and n.outputs and n.outputs[0].name == output)
    weight = constant_value(node.inputs[1])
    group = int(node.attrs.get("group", 1))
    dense = lowrank.reconstruct(lowrank.factorize(lowrank.channel_spectra(weight, group), rank)).astype(weight.dtype)
    node.inputs = [node.inputs[0], gs.Constant(names.fresh(f"{output}/probe_W"), dense), *node.inputs[2:]]
    graph.cleanup(remove_unused_graph_inputs=False)
    return export_model(graph, model)


def default_cache_path() -> Path:
    return user_cache_path("sensitivity.json")


def load_eval_script(path: str | os.PathLike) -> tuple[Evaluate, str]:
    """``evaluate(model_path) -> float`` from a Python file, wrapped to take a ModelProto; and the file's hash."""
    import importlib.util  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from .errors import InputError  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise InputError(f"eval script not found: {path}")
    source = path.read_bytes()
    spec = importlib.util.spec_from_file_location("dsrewrite_user_eval", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"eval script {path} failed to import: {type(exc).__name__}: {exc}") from None
    user_evaluate = getattr(module, "evaluate", None)
    if not callable(user_evaluate):
        raise InputError(f"eval script {path} must define evaluate(model_path) -> float")

    def evaluate(model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="dsrewrite-eval-") as tmp:
            model_path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, model_path)
            try:
                score = float(user_evaluate(model_path))
            except Exception as exc:
                raise InputError(f"eval script {path} failed: {type(exc).__name__}: {exc}") from None
        if not np.isfinite(score):
            raise InputError(f"eval script {path} returned a non-finite score: {score}")
        return score

    return evaluate, hashlib.sha256(source).hexdigest()


# -- latency ------------------------------------------------------------------------------------

# A rewrite must beat the original conv by this factor in its microbenchmark to be kept:
# medians of interleaved runs still carry a few percent of noise on a shared machine.
MIN_SPEEDUP = 1.05
# Under a MAC budget, a rank is used only if, timed alone, it saves at least this share of the time its MACs
# predict: depthwise convs are memory-bound, and a rank that saves MACs but little time spends the accuracy
# budget for nothing.
MIN_EFFICIENCY = 0.5


@dataclass
class LatencyOutcome:
    forms: dict[str, str] = field(default_factory=dict)  # conv output -> fastest form at its rank
    slower: dict[str, str] = field(default_factory=dict)  # conv output -> why it stays original
    measured: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # (original ms, rewrite ms)


def single_conv_model(model: onnx.ModelProto, output: str, input_shape: Sequence[int]) -> onnx.ModelProto:
    """A model holding only the conv that writes ``output``, fed at ``input_shape``."""
    graph = gs.import_onnx(model)
    node = next(n for n in graph.nodes if n.op == "Conv" and n.outputs and n.outputs[0].name == output)
    weight = constant_value(node.inputs[1])
    x = gs.Variable("x", dtype=weight.dtype, shape=list(input_shape))
    y = gs.Variable(output, dtype=weight.dtype)
    inputs = [x, gs.Constant("W", weight)]
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_value(node.inputs[2])
        inputs.append(gs.Constant("B", bias if bias is not None else np.zeros(weight.shape[0], weight.dtype)))
    conv = gs.Node("Conv", node.name or "conv", dict(node.attrs), inputs, [y])
    single = gs.Graph(nodes=[conv], inputs=[x], outputs=[y], opset=graph.opset)
    return export_model(single, model)


def measure_conv_candidates(
    model: onnx.ModelProto,
    plan: LayerPlan,
    input_shape: Sequence[int],
    ranks: Sequence[int],
    cache,
    *,
    threads: int,
) -> dict[str, float]:
    """Median ms of the original conv ("original") and of each "rank:form" rewrite of it."""
    from . import latency  # noqa: PLC0415
    from .passes import Cleanup, DecomposeConv, DecomposeOptions  # noqa: PLC0415
    from .pipeline import Pipeline  # noqa: PLC0415
    from .plan import valid_forms  # noqa: PLC0415

    single = single_conv_model(model, plan.output, input_shape)
    candidates = {"original": single}
    for rank in ranks:
        for form in valid_forms(rank, plan.group):
            options = DecomposeOptions(layer_ranks={plan.output: rank}, layer_forms={plan.output: form})
            candidates[f"{rank}:{form}"] = Pipeline([DecomposeConv(options), Cleanup()]).run(single).model
    layer_key = {
        "kernel": plan.kernel, "in": plan.in_channels, "out": plan.out_channels, "group": plan.group,
        "input_shape": list(input_shape), "attrs": {a.name: str(onnx.helper.get_attribute_value(a)) for a in single.graph.node[0].attribute},
        "dtype": str(single.graph.input[0].type.tensor_type.elem_type),
    }  # fmt: skip
    return latency.measure_layer(candidates, input_shape, layer_key, cache, threads=threads)


def check_latency(
    model: onnx.ModelProto,
    plans: Sequence[LayerPlan],
    shapes: dict,
    cache,
    *,
    threads: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> LatencyOutcome:
    """Time every planned rewrite against its original conv; keep the fastest form, flag the slower ones."""
    outcome = LatencyOutcome()
    todo = [p for p in plans if p.rewritten and p.graph == "main"]
    for index, plan in enumerate(todo):
        shape = _input_shape(model, plan, shapes)
        if shape is None:
            log.info("%s: input shape unknown, latency not measured", plan.node)
            continue
        timing = RankTimings.of(measure_conv_candidates(model, plan, shape, [plan.rank], cache, threads=threads), [plan.rank])
        original = timing.original_ms
        form, best = timing.best[plan.rank]
        outcome.measured[plan.output] = (original, best)
        if best * MIN_SPEEDUP > original:
            outcome.slower[plan.output] = (
                f"rank {plan.rank} measured no faster than the original conv "
                f"({best:.3f} ms vs {original:.3f} ms in onnxruntime)"
            )
        else:
            outcome.forms[plan.output] = form
        if progress:
            progress("timing convs", index + 1, len(todo))
    cache.save()
    return outcome


def _input_shape(model: onnx.ModelProto, plan: LayerPlan, shapes: dict) -> list[int] | None:
    node = next((n for n in model.graph.node if n.op_type == "Conv" and n.output and n.output[0] == plan.output), None)
    if node is None:
        return None
    shape = shapes.get(node.input[0])
    if shape is None or any(d is None for d in shape):
        return None
    return [int(d) for d in shape]


@dataclass
class RankTimings:
    """One conv timed alone: the original, and the fastest form at each measured rank (median ms)."""

    original_ms: float
    best: dict[int, tuple[str, float]]  # rank -> (form, ms)

    @classmethod
    def of(cls, times: dict[str, float], ranks: Sequence[int]) -> "RankTimings":
        """From ``measure_conv_candidates`` times: the fastest form at each rank (ties: form name)."""
        best = {}
        for rank in ranks:
            options = [(k.split(":", 1)[1], v) for k, v in times.items() if k.startswith(f"{rank}:")]
            best[rank] = min(options, key=lambda kv: (kv[1], kv[0]))
        return cls(times["original"], best)

    def realised(self, rank: int) -> float:
        """Fraction of the conv's time the rewrite at ``rank`` saves (negative: slower)."""
        return 1.0 - self.best[rank][1] / self.original_ms


def time_rank_ladders(
    model: onnx.ModelProto,
    plans: Sequence[LayerPlan],
    shapes: dict,
    cache,
    *,
    threads: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, RankTimings]:
    """Time every eligible main-graph conv alone at every candidate rank, in every form."""
    timings = {}
    todo = [p for p in plans if p.eligible and p.graph == "main" and p.error_at_rank]
    for index, plan in enumerate(todo):
        shape = _input_shape(model, plan, shapes)
        ranks = candidate_ranks(plan, limit=10)
        if shape is not None and ranks:
            times = measure_conv_candidates(model, plan, shape, ranks, cache, threads=threads)
            timings[plan.output] = RankTimings.of(times, ranks)
        if progress:
            progress("timing candidate ranks", index + 1, len(todo))
    cache.save()
    return timings


def restrict_to_efficient_ranks(plans: Sequence[LayerPlan], timings: dict[str, RankTimings], efficiency: float) -> int:
    """Take out of each conv's error curve the ranks that do not pay in time; return how many.

    A rank stays only if, timed alone, it is faster than the conv by ``MIN_SPEEDUP`` and
    saves at least ``efficiency`` of the time its MAC count says it should save
    (``efficiency=0``: only "faster" is required).
    """
    removed = 0
    for plan in plans:
        timing = timings.get(plan.output)
        if timing is None or not plan.error_at_rank:
            continue
        errors = list(plan.error_at_rank)
        for r in range(1, len(errors) + 1):
            if not math.isfinite(errors[r - 1]):
                continue
            predicted = 1.0 - _separable_macs(plan, r) / plan.macs_per_pixel_before
            keep = (
                r in timing.best
                and timing.best[r][1] * MIN_SPEEDUP <= timing.original_ms
                and timing.realised(r) >= efficiency * predicted
            )
            if not keep:
                errors[r - 1] = float("inf")
                removed += 1
        plan.error_at_rank = errors
    return removed


def _separable_macs(plan: LayerPlan, rank: int) -> int:
    """MACs per output pixel of the conv's rank-``rank`` rewrite."""
    k = math.prod(plan.kernel)
    return separable_cost(plan.in_channels, plan.out_channels, k, plan.group, rank, None, False).macs_per_pixel


def latency_budget_decisions(
    plans: Sequence[LayerPlan], timings: dict[str, RankTimings], *, target: float, model_ms: float
) -> Decisions:
    """``--target-latency``: ranks so the model runs in about ``target`` of its time.

    With ``T`` the model's time and ``E`` its eligible convs' time (each timed
    alone), the convs must come down to ``E − (1 − target)·T`` (Amdahl), and
    :func:`~dsrewrite.budget.allocate` spends that time budget as it spends a
    MAC budget: least estimated error per millisecond saved. Ranks no faster
    than the original conv are never candidates.
    """
    from .budget import ErrorCurve  # noqa: PLC0415

    curves = []
    for plan in plans:
        timing = timings.get(plan.output)
        if timing is None:
            continue
        full = len(plan.error_at_rank)
        cost = [0] * (full + 1)
        errors = [0.0] + [float("inf")] * full
        for rank, (_form, ms) in timing.best.items():
            if ms * MIN_SPEEDUP <= timing.original_ms and math.isfinite(plan.error_at_rank[rank - 1]):
                cost[rank] = int(ms * 1e6)  # ns, integral like MACs
                errors[rank] = plan.error_at_rank[rank - 1]
        top = max([r for r in range(1, full + 1) if math.isfinite(errors[r])], default=0)
        curves.append(ErrorCurve(plan.output, int(timing.original_ms * 1e6), tuple(cost[: top + 1]), tuple(errors[: top + 1])))
    eligible_ms = sum(c.macs_before for c in curves) / 1e6
    if eligible_ms <= 0:
        return Decisions({}, {}, ["--target-latency: no conv could be timed"])
    allocation = allocate(curves, max(eligible_ms - (1.0 - target) * model_ms, 0.0) / eligible_ms)
    predicted_ms = model_ms - eligible_ms + allocation.macs_after / 1e6
    notes = [
        f"--target-latency {target:g}: model {model_ms:.3f} ms, eligible convs {eligible_ms:.3f} ms alone; "
        f"predicted {predicted_ms:.3f} ms ({predicted_ms / model_ms:.2f} of the original)"
    ]
    if predicted_ms > target * model_ms * 1.02:
        notes.append("the latency target is out of reach with the measured ranks; this is the fastest allocation found")
    reasons = {k: "left unrewritten by the latency budget" for k, r in allocation.ranks.items() if r is None}
    return Decisions(allocation.ranks, reasons, notes)


def forms_and_times(decisions: Decisions, timings: dict[str, RankTimings]):
    """The fastest form and the (original, rewrite) times of each decided conv."""
    forms, measured = {}, {}
    for key, rank in decisions.ranks.items():
        timing = timings.get(key)
        if timing is None:
            continue
        if rank is not None and rank in timing.best:
            forms[key] = timing.best[rank][0]
            measured[key] = (timing.original_ms, timing.best[rank][1])
        else:
            measured[key] = (timing.original_ms, None)
    return forms, measured
