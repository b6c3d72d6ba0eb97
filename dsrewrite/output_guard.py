"""The output guard: the rewrite may move the model's outputs by at most a bound.

Every strategy decides conv by conv, from estimates: layer errors, or
output-level errors measured one conv at a time. What a user ships is all
the rewrites at once. After the fit, this stage measures exactly that: the
model with every decided conv computing its *fitted* factors (the dense
kernel they compute, ``lowrank.reconstruct``; the same function the emitted
depthwise + pointwise pair computes), against the original, on calibration
feeds, with the output measure of ``output_effect`` (KL for outputs that are
distributions over their last axis, relative MSE otherwise).

When that joint error is over the bound, the rewrites are ranked by cost: each
conv's output-level error alone at its rank (``model_output_error`` when the
allocation measured it, else the model with only that conv computing factors
fitted on the original model's inputs: a sequential fit of an early conv is
measured alone without the later fits that compensate for it, which overstates it)
per unit of what it saves (in-model or per-conv time when every rewrite was
timed, MACs otherwise). The guard then keeps the longest cheapest-first prefix
whose rewrites, fitted again *as that set*, stay within the bound: a binary
search, so a model with n rewritten convs costs about log2(n) extra fits.
Refitting matters: a sequential fit compensates for the rewritten convs
before it, so dropping a conv without refitting the rest leaves fits that
correct an error no longer there (measured: restoring any one conv of a
captcha reader's rank-2 rewrite *raised* the joint error). For the same
reason, marginal errors (joint minus joint with one conv restored) rank
nothing and are not used. ``error_kept`` is measured on the factors emitted.

**The bound.** ``--max-output-error F`` sets it. Under ``--quantize int8`` it
defaults to the output error of INT8 itself: the prepared model, quantized the
same way with no conv rewritten, measured on the same feeds. So the rewrite
adds at most as much error as the quantization the user accepted, and a model
on which only accuracy-costly rewrites pay in INT8 keeps its convs.

**Every part within its bound.** The bound holds for each part of the measure
(``OutputProbe.parts``: each output, each feature of a head), not for their
mean: a mean can hide the part that decides. A YOLOX-style detector's rank-1
rewrite moved its head's objectness score six times as far as INT8 does (0.31
against 0.053) while the head as a whole moved less than under INT8, and lost 3.5
points of F1 once quantized. Under INT8 each part's bound is INT8's own error on
that part, but at least ``PART_FLOOR`` of INT8's error on the whole: a part INT8
happens to leave almost untouched does not forbid every rewrite. With several
parts, a conv's error alone is the largest share of a part's bound it uses
(``bound_shares``, measured with the independent fits), not its mean error: a
conv that moves little on average but much in the part over its bound ranks as
costly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from .cores import available_cores
from .plan import LayerPlan, is_fit_note

if TYPE_CHECKING:
    from .context import RewriteContext

# Calibration feeds the joint error is measured on: twice the allocation probe's, since one number decides.
GUARD_FEEDS = 16
# Under INT8, no part's bound is under this share of INT8's error on the whole measure.
PART_FLOOR = 0.1
# GuardOutcome.factors when fine-tuned factors over the bound gave way to the fits they started from.
FITS_KEPT = "fitted (the fine-tuned factors were over the bound)"


@dataclass
class GuardOutcome:
    """What the guard measured and did; ``record()`` is the report's ``output_guard``."""

    bound: float
    bound_source: str  # "--max-output-error" or "INT8 without rewrite"
    measure: str
    feeds: int
    error_all_rewrites: float  # every decided rewrite at once
    error_kept: float  # what is kept
    reverted: list[str] = field(default_factory=list)  # node names, in the order they were left alone
    worst_part: dict | None = None  # all rewrites at once: the part furthest over (or nearest) its bound
    runs: int = 0
    seconds: float = 0.0  # the guard's own time, refits included
    factors: str = "fitted"  # what was judged: "fitted" (closed form, refitted per trial) or "fine-tuned" (as trained)

    def record(self) -> dict:
        return {
            "bound": self.bound,
            "bound_source": self.bound_source,
            "measure": self.measure,
            "feeds": self.feeds,
            "error_all_rewrites": self.error_all_rewrites,
            "error_kept": self.error_kept,
            "reverted": list(self.reverted),
            "worst_part": self.worst_part,
            "runs": self.runs,
            "seconds": round(self.seconds, 3),
            "factors": self.factors,
        }

    def note(self) -> str:
        head = (
            f"output guard ({self.measure}, {self.feeds} calibration feed(s)): all decided rewrites at once move the "
            f"outputs by {self.error_all_rewrites:.4g}, bound {self.bound:.4g} ({self.bound_source})"
        )
        worst = self.worst_part
        if worst is not None and worst["error"] > worst["bound"] and worst["error"] > 0:
            head += f"; {worst['part']} moves by {worst['error']:.4g}, over its bound {worst['bound']:.4g}"
        if self.factors == FITS_KEPT:
            return head + f": the closed-form fits they were trained from move them by {self.error_kept:.4g} and are kept"
        if not self.reverted:
            return head + ": every rewrite kept"
        hint = "; --max-output-error sets another bound, inf none" if self.bound_source != "--max-output-error" else ""
        rest = "the rest keep their fine-tuned weights" if self.factors == "fine-tuned" else "the rest fitted again"
        return head + (
            f": {len(self.reverted)} conv(s) left alone (the costliest error per saving) and {rest}, "
            f"which brings it to {self.error_kept:.4g}{hint}"
        )


def savings(plans: Sequence[LayerPlan]) -> tuple[dict[str, float], str]:
    """What each rewritten conv saves, in one unit for all: ms (in the model, else alone) when every one was timed."""
    in_model = {p.output: p.in_model_before_ms - p.in_model_after_ms for p in plans
                if p.in_model_before_ms is not None and p.in_model_after_ms is not None}  # fmt: skip
    if in_model and len(in_model) == len(plans):
        return in_model, "ms in the model"
    alone = {p.output: p.latency_before_ms - p.latency_after_ms for p in plans
             if p.latency_before_ms is not None and p.latency_after_ms is not None}  # fmt: skip
    if alone and len(alone) == len(plans):
        return alone, "ms"
    return {p.output: float((p.macs_before or p.macs_per_pixel_before) - (p.macs_after or p.macs_per_pixel_after))
            for p in plans}, "MACs"  # fmt: skip


def int8_part_bounds(parts: np.ndarray, whole: float) -> np.ndarray:
    """Each part's bound under INT8: INT8's own error on it, but at least ``PART_FLOOR`` of its error on the whole."""
    return np.maximum(np.asarray(parts, dtype=np.float64), PART_FLOOR * whole)


def bound_shares(parts: np.ndarray, part_bounds: np.ndarray) -> np.ndarray:
    """The share of its bound that each part uses (over 1: over that bound)."""
    return np.asarray(parts, dtype=np.float64) / np.maximum(part_bounds, 1e-300)


def admission_order(alone: Mapping[str, float], saved: Mapping[str, float]) -> list[str]:
    """Convs by error alone per unit saved, lowest first (a conv that saves nothing comes last)."""

    def cost(key: str) -> float:
        gain = saved.get(key, 0.0)
        return math.inf if gain <= 0 else alone[key] / gain

    return sorted(alone, key=lambda k: (cost(k), alone[k], k))


def guard(
    ctx: "RewriteContext", plans: Sequence[LayerPlan], fitted: Mapping, bound: float | None,
    fit_without: Callable[[set[str]], Mapping], fit_independently: Callable[[], Mapping] | None = None,
    trained: bool = False, fallback: Mapping | None = None,
) -> tuple[GuardOutcome, Mapping] | None:  # fmt: skip
    """Leave convs alone (``decide.revert``) until the fitted rewrites move the outputs by at most the bound.

    ``bound=None``: the INT8-without-rewrite error (``--quantize int8``). ``fit_without(keys)``: the factors when the
    convs in ``keys`` are left alone; ``fit_independently()``: every decided conv fitted on the original model's
    inputs, for the ranking (sequential fits overstate an early conv's error alone). ``trained``: ``fitted`` holds
    fine-tuned factors, ranked by what each does alone as trained, and ``fit_without`` returns the others as
    trained; ``fallback``: the fits they were trained from, kept whole (no conv left alone) when the trained factors
    are over the bound and the fits are not. Returns the outcome and the
    factors to emit, or None when there is nothing to guard or the outputs cannot be compared (a note says which).
    """
    from .decide import revert  # noqa: PLC0415
    from .output_effect import NotComparable, OutputProbe, probe_feeds  # noqa: PLC0415

    todo = [p for p in plans if p.rewritten and p.graph == "main" and p.output in fitted
            and fitted[p.output].factors.rank == p.rank]  # fmt: skip
    if not todo:
        return None
    start = time.perf_counter()
    threads = available_cores()
    feeds = probe_feeds(ctx.calibration, len(ctx.calibration), GUARD_FEEDS)
    try:
        probe = OutputProbe.open(ctx.model, [p.output for p in todo], feeds, threads=threads)
    except NotComparable as exc:
        ctx.warn([f"output guard skipped: the model's outputs cannot be compared ({exc}); every rewrite was kept"])
        return None
    source, names = "--max-output-error", probe.part_names()
    if bound is None:
        quantized = probe.parts(probe.outputs_of_model(ctx.deployed_model(), threads=threads))
        bound, source = probe.measure_of(quantized), "INT8 without rewrite"
        part_bounds = int8_part_bounds(quantized, bound)
    else:
        part_bounds = np.full(len(names), bound)

    def joint(factors: Mapping, keys) -> tuple[float, np.ndarray]:
        if not keys:
            return 0.0, np.zeros(len(names))
        parts = probe.parts(probe.outputs_with({k: (factors[k].factors, factors[k].bias) for k in keys}))
        return probe.measure_of(parts), parts

    def within(parts: np.ndarray) -> bool:
        return bool(np.all(parts <= part_bounds))

    error, parts = joint(fitted, [p.output for p in todo])
    outcome = GuardOutcome(bound, source, probe.describe(), len(feeds), error, error,
                           factors="fine-tuned" if trained else "fitted")  # fmt: skip
    if len(names) > 1:
        worst = int(np.argmax(bound_shares(parts, part_bounds)))
        outcome.worst_part = {"part": names[worst], "error": float(parts[worst]), "bound": float(part_bounds[worst])}
    if not within(parts) and fallback is not None:
        fallback_error, fallback_parts = joint(fallback, [p.output for p in todo])
        if within(fallback_parts):  # training moved the outputs further than the fits it started from
            outcome.factors, outcome.error_kept = FITS_KEPT, fallback_error
            outcome.runs, outcome.seconds = probe.runs, time.perf_counter() - start
            return outcome, fallback
    if not within(parts):
        if len(names) > 1:
            # Several parts: what each conv alone costs is the largest share of a part's bound it uses, so a conv
            # that moves little on average but much in the part over its bound ranks as costly.
            ranking = fit_independently() if fit_independently is not None else fitted
            alone = {key: float(bound_shares(joint(ranking if key in ranking else fitted, [key])[1], part_bounds).max())
                     for key in (p.output for p in todo)}  # fmt: skip
        else:  # trained factors are ranked as trained, not by the allocation's estimates of the fits
            alone = {} if trained else {p.output: p.model_output_error for p in todo if p.model_output_error is not None}
            missing = [p.output for p in todo if p.output not in alone]
            if missing:
                ranking = fit_independently() if fit_independently is not None else fitted
                alone.update({key: joint(ranking if key in ranking else fitted, [key])[0] for key in missing})
        saved, unit = savings(todo)
        order = admission_order(alone, saved)
        by_key = {p.output: p for p in todo}
        fitted, outcome.error_kept = fit_without(set(order)), 0.0
        low, high = 0, len(order)  # invariant: the first `low` fit within the bound, the first `high` do not
        while high - low > 1:
            middle = (low + high) // 2
            trial = fit_without(set(order[middle:]))
            trial_error, trial_parts = joint(trial, order[:middle])
            if within(trial_parts):
                low, fitted, outcome.error_kept = middle, trial, trial_error
            else:
                high = middle
        worst = outcome.worst_part
        moved = (f"moved the outputs by {error:.3g}, over the bound {bound:.3g}" if error > bound or worst is None else
                 f"moved {worst['part']} by {worst['error']:.3g}, over its bound {worst['bound']:.3g}")  # fmt: skip
        for key in order[low:]:
            plan = by_key[key]
            _forget_fit(plan)
            cost = f"{alone[key]:.3g} of a part's bound" if len(names) > 1 else f"{alone[key]:.3g}"
            revert(plan, f"left alone by the output guard: all rewrites at once {moved} ({source}); this conv alone "
                         f"costs {cost} for {saved.get(key, 0.0):.3g} {unit} saved")  # fmt: skip
            outcome.reverted.append(plan.node or plan.output)
    outcome.runs, outcome.seconds = probe.runs, time.perf_counter() - start
    return outcome, fitted


def _forget_fit(plan: LayerPlan) -> None:
    """A conv left alone after its fit: the fit's figures describe factors that are not emitted."""
    plan.output_error = plan.output_error_data_free = plan.fit_seconds = None
    plan.activation = plan.fit_target = plan.activated_error = plan.activated_error_linear = None
    plan.fit = "data-free"
    plan.notes[:] = [n for n in plan.notes if not is_fit_note(n)]  # the fit's own notes describe it too
