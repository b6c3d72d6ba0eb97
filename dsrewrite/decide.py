"""The decide stage: strategies that map (plans, measurements) to one Decision per conv.

Every strategy has the same small interface: ``needs`` (the measurements it
wants made first, see ``dsrewrite.measure``) and ``decide(plans, measured) ->
Decisions``. :func:`choose_strategy` picks one from the options, and
:func:`apply_decisions` writes the decisions into the plans, which is all the
emission pass reads.

* :class:`UniformRank`: one rank (or ``full``) for every eligible conv.
* :class:`DataFreeAuto`: ``--rank auto`` from the kernel spectrum alone.
* :class:`CalibratedAuto`: ``--rank auto`` on measured error curves.
* :class:`MacBudget`: ``--target-macs``, least estimated error per MAC saved;
  latency-aware, ranks that do not pay in time only fill the remainder.
* :class:`LatencyBudget`: ``--target-latency`` from measured conv times.
* :class:`SavedPlan`: ``--plan``, the decisions of an earlier run.
* :class:`NeverSlower`: wraps another strategy, times what it decided and keeps
  the fastest emission form, or the original conv when no form is faster.

Task sensitivity (``--eval-script``) is not a strategy of its own: it is a way
of measuring the error curves (``error_source = "evaluation"``) that the auto
and budget strategies then read, so it combines with both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, Sequence

from .budget import ErrorCurve, allocate, choose_auto_rank, costing_pixels, curves_from_plans, smallest_rank_within
from .cost import projected_cost, separable_cost
from .plan import FORM_PROJECTED, REWRITTEN, SKIPPED, Decision, Decisions, LayerPlan, decisions_from_document, default_form, valid_forms

if TYPE_CHECKING:
    from .measure import Measured, RankTimings

# Measurements a strategy can ask for (see dsrewrite.measure).
ERROR_CURVES = "error_curves"  # calibration or task-evaluation error per rank, replacing the spectrum's
RANK_LADDERS = "rank_ladders"  # every eligible conv timed at its candidate ranks (in place, or alone in every form)
MODEL_TIME = "model_time"  # the whole model's median latency

# A rewrite must beat the original conv by this factor in its microbenchmark to be kept:
# medians of interleaved runs still carry a few percent of noise on a shared machine.
MIN_SPEEDUP = 1.05
# Under a MAC budget, a rank is used only if, as timed, it saves at least this share of the time its MACs
# predict: depthwise convs are memory-bound, and a rank that saves MACs but little time spends the accuracy
# budget for nothing.
MIN_EFFICIENCY = 0.5
# ... unless that raises the allocation's estimated error by more than this factor over using every faster rank.
EFFICIENCY_ERROR_SLACK = 1.25


class Strategy(Protocol):
    needs: frozenset[str]

    def decide(self, plans: Sequence[LayerPlan], measured: "Measured") -> Decisions: ...


def eligible(plans: Sequence[LayerPlan]) -> list[LayerPlan]:
    return [p for p in plans if p.eligible]


# -- strategies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UniformRank:
    """The same rank everywhere (``"full"``: exact); a rank that saves no MACs leaves the conv alone."""

    rank: int | str
    needs: frozenset[str] = frozenset()

    def decide(self, plans, measured=None) -> Decisions:
        decisions = Decisions()
        for plan in eligible(plans):
            if self.rank == "full":
                decisions.layers[plan.output] = Decision(plan.full_rank)
                continue
            r = min(int(self.rank), plan.full_rank)
            per_pixel = plan.macs_per_pixel_at(r)
            if per_pixel >= plan.macs_per_pixel_before:
                ratio = per_pixel / plan.macs_per_pixel_before
                decisions.layers[plan.output] = Decision(None, f"rank {r} saves no MACs ({ratio:.2f}x the original)")
            else:
                decisions.layers[plan.output] = Decision(r)
        return decisions


@dataclass(frozen=True)
class DataFreeAuto:
    """The smallest rank whose kernel error (white inputs) is within ``max_error`` and that saves MACs."""

    max_error: float
    needs: frozenset[str] = frozenset()

    def decide(self, plans, measured=None) -> Decisions:
        decisions = Decisions()
        for plan in eligible(plans):
            per_pixel = [0] + [plan.macs_per_pixel_at(r) for r in range(1, plan.full_rank + 1)]
            choice = choose_auto_rank(plan.analysis.kernel_errors, per_pixel, plan.macs_per_pixel_before, self.max_error)
            decisions.layers[plan.output] = Decision(choice.rank, choice.reason)
        return decisions


@dataclass(frozen=True)
class CalibratedAuto:
    """The cheapest rank whose measured error (√NMSE) is within ``max_error``."""

    max_error: float
    needs: frozenset[str] = frozenset({ERROR_CURVES})

    def decide(self, plans, measured=None) -> Decisions:
        curves, _ = curves_from_plans(plans)
        decisions = Decisions()
        for curve in curves:
            rank = smallest_rank_within(curve, self.max_error)
            reason = None if rank is not None else f"no rank that saves MACs keeps the measured error <= {self.max_error:g}"
            decisions.layers[curve.key] = Decision(rank, reason)
        return decisions


@dataclass(frozen=True)
class MacBudget:
    """``--target-macs``: the eligible convs keep at most ``target`` of their MACs.

    Latency-aware: every eligible conv is timed at its candidate ranks first (in place in the model);
    ranks that save under ``MIN_EFFICIENCY`` of their MAC-predicted time are only used
    to fill what the allocation leaves of the budget, and slower ranks never.
    """

    target: float
    latency_aware: bool = False
    threads: int = 1

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({ERROR_CURVES, RANK_LADDERS} if self.latency_aware else {ERROR_CURVES})

    def decide(self, plans, measured=None) -> Decisions:
        decisions = self._decide(plans, measured)
        offer_projection(plans, decisions, self.target)
        return decisions

    def _decide(self, plans, measured) -> Decisions:
        decisions = self._allocate(plans, measured)
        outputs = getattr(measured, "outputs", None)
        if outputs is None:
            return decisions
        # Output-level curves were measured one conv at a time; measure again around this allocation, with every
        # other conv at its allocated rank, so interactions between convs enter the final allocation.
        first = decisions.ranks
        final = self._allocate(outputs.remeasure(plans, first), measured)
        changed = sum(1 for key, rank in final.ranks.items() if rank != first.get(key))
        # The second allocation rests on marginal errors measured around the first; whichever of the two moves
        # the outputs less when all its rewrites run at once is kept (two probe runs).
        first_error = outputs.joint_error(first)
        final_error = outputs.joint_error(final.ranks) if changed else first_error  # same ranks: same error
        if changed and final_error > first_error:
            kept, outcome = decisions, (
                f"{changed} conv(s) would have changed rank, but all rewrites at once moved the outputs by "
                f"{final_error:.3g} against {first_error:.3g} for the first allocation, which is kept"
            )
        else:
            kept, outcome = final, (
                f"{changed} conv(s) changed rank (all rewrites at once: {final_error:.3g}; first allocation: {first_error:.3g})"
            )
        kept.notes.append(
            f"output-level errors re-measured once around the first allocation, with every other conv at its "
            f"allocated rank: {outcome} ({outputs.cost()} for output-level errors in all)"
        )
        return kept

    def _allocate(self, plans, measured) -> Decisions:
        if not self.latency_aware:
            return budget_decisions(plans, self.target)
        timings = measured.ladders
        faster = _copies(plans)
        restrict_to_efficient_ranks(faster, timings, 0.0)
        efficient = _copies(plans)
        removed = restrict_to_efficient_ranks(efficient, timings, MIN_EFFICIENCY)
        decisions = budget_decisions(efficient, self.target, fill_plans=faster, where=measured.where)
        # Preferring efficient ranks must not cost much accuracy: when it raises the estimated error by more than
        # EFFICIENCY_ERROR_SLACK over the best allocation of merely faster ranks, that one is used instead.
        plain = budget_decisions(faster, self.target, where=measured.where)
        preferred_error, plain_error = _estimated_error(faster, decisions), _estimated_error(faster, plain)
        efficiency_note = (
            f"{removed} rank(s) that save under {MIN_EFFICIENCY:.0%} of their MAC-predicted time were only used to "
            "fill the budget's remainder"
        )
        if preferred_error > EFFICIENCY_ERROR_SLACK * plain_error:
            decisions = plain
            efficiency_note = (
                f"preferring the {MIN_EFFICIENCY:.0%}-efficient ranks would have raised the estimated error "
                f"{preferred_error / max(plain_error, 1e-12):.1f}-fold, so every rank faster than its conv was a candidate"
            )
        for plan in faster:  # say so where no rank is faster at all, rather than "cheaper error elsewhere"
            decision = decisions.layers.get(plan.output)
            if decision is not None and decision.rank is None and plan.output in timings and not any(
                math.isfinite(e) for e in plan.error_at_rank
            ):
                how = "in place" if timings[plan.output].in_place else "conv alone"
                decision.reason = f"no rank measured faster than the original conv ({measured.where}, {how})"
        _attach_timings(decisions, timings)
        decisions.notes = decisions.notes + [
            f"latency-aware: {measured.describe(timings)}, at their candidate ranks; {efficiency_note}"
        ]
        return decisions


@dataclass(frozen=True)
class LatencyBudget:
    """``--target-latency``: ranks so the model runs in about ``target`` of its time.

    With ``T`` the model's time and ``E`` its eligible convs' time (each timed
    alone), the convs must come down to ``E − (1 − target)·T`` (Amdahl), and
    :func:`~dsrewrite.budget.allocate` spends that time budget as it spends a
    MAC budget: least estimated error per millisecond saved. Ranks no faster
    than the original conv are never candidates.
    """

    target: float
    needs: frozenset[str] = frozenset({ERROR_CURVES, MODEL_TIME, RANK_LADDERS})

    def decide(self, plans, measured=None) -> Decisions:
        timings, model_ms = measured.ladders, measured.model_ms
        curves = [_time_curve(plan, timings[plan.output]) for plan in plans if plan.output in timings]
        eligible_ms = sum(c.macs_before for c in curves) / 1e6
        if eligible_ms <= 0:
            return Decisions(notes=["--target-latency: no conv could be timed"])
        allocation = allocate(curves, max(eligible_ms - (1.0 - self.target) * model_ms, 0.0) / eligible_ms)
        predicted_ms = model_ms - eligible_ms + allocation.macs_after / 1e6
        notes = [
            f"--target-latency {self.target:g}: model {model_ms:.3f} ms, eligible convs {eligible_ms:.3f} ms as timed; "
            f"predicted {predicted_ms:.3f} ms ({predicted_ms / model_ms:.2f} of the original)"
        ]
        if predicted_ms > self.target * model_ms * 1.02:
            notes.append("the latency target is out of reach with the measured ranks; this is the fastest allocation found")
        decisions = _from_ranks(allocation.ranks, "left unrewritten by the latency budget", notes)
        _attach_timings(decisions, timings)
        return decisions


@dataclass(frozen=True)
class SavedPlan:
    """``--plan``: the ranks and forms of a saved plan; convs it does not name stay as they are."""

    decisions: Decisions
    needs: frozenset[str] = frozenset()

    def decide(self, plans, measured=None) -> Decisions:
        decisions = replace(self.decisions, layers=dict(self.decisions.layers), notes=list(self.decisions.notes))
        known = {p.output for p in plans}
        unknown = sorted(set(decisions.layers) - known)
        if unknown:
            decisions.notes.append(f"the plan names {len(unknown)} conv(s) this model does not have, e.g. {unknown[0]!r}")
        return decisions

    @classmethod
    def from_document(cls, document) -> "SavedPlan":
        return cls(decisions_from_document(document))


@dataclass(frozen=True)
class NeverSlower:
    """Time what ``inner`` decided against each original conv; keep the fastest form, never a slower conv."""

    inner: Strategy
    threads: int = 1

    @property
    def needs(self) -> frozenset[str]:
        return self.inner.needs

    def decide(self, plans, measured=None) -> Decisions:
        decisions = self.inner.decide(plans, measured)
        decided = [
            p for p in eligible(plans) if p.graph == "main" and decisions.layers.get(p.output, Decision(None)).rank is not None
        ]
        ranks = {p.output: min(decisions.layers[p.output].rank, p.full_rank) for p in decided}
        # A projected rewrite is timed as itself; the others in every form, the fastest kept.
        projected = {p.output: [FORM_PROJECTED] for p in decided if decisions.layers[p.output].form == FORM_PROJECTED}
        timings = measured.timer.at_ranks(decided, ranks, projected)
        fallbacks = {}
        for key, timing in timings.items():
            rank = ranks[key]
            form, best = timing.best[rank]
            original = timing.original_ms
            replaced = decisions.layers[key].replaces
            if best * MIN_SPEEDUP > original and replaced is not None:
                fallbacks[key] = replaced  # the separable decision the projected one replaced, timed below
            elif best * MIN_SPEEDUP > original:
                reason = (
                    f"rank {rank} measured no faster than the original conv "
                    f"({best:.3f} ms vs {original:.3f} ms in {measured.where}, {'in place' if timing.in_place else 'conv alone'})"
                )
                decisions.layers[key] = Decision(None, reason, latency_ms=(original, best))
            else:
                decisions.layers[key] = replace(decisions.layers[key], form=form, latency_ms=(original, best))
        for key in set(ranks) - set(timings):  # not timed: the default form (a projected rewrite stays one)
            if key not in projected:
                decisions.layers[key] = replace(decisions.layers[key], form=None)
        if fallbacks:
            decisions.notes.append(
                f"{len(fallbacks)} input-projected rewrite(s) measured no faster than their conv: the separable "
                "rank each replaced is timed instead"
            )
            for key, replaced in fallbacks.items():
                decisions.layers[key] = replaced
            inner_only = replace(self, inner=SavedPlan(Decisions(dict(fallbacks))))
            retimed = inner_only.decide([p for p in decided if p.output in fallbacks], measured)
            decisions.layers.update({key: retimed.layers[key] for key in fallbacks if key in retimed.layers})
        if timings:
            decisions.notes.append(
                f"latency-aware: {measured.describe(timings)}; "
                "each kept rewrite is the fastest emission form and beats its original conv"
            )
        return decisions


def offer_projection(plans: Sequence[LayerPlan], decisions: Decisions, target: float) -> None:
    """Give a rewritten conv with 2-4 input channels the input-projected form (``dsrewrite.projection``) where,
    within its separable rank's MACs plus what the budget leaves, a projected rank has less layer-level error.

    The allocation only knows separable ranks; a stem's projected ranks interleave with them in cost (PP-OCR's
    3→8 stem: projected 3 costs 0.29 of the conv, between separable 1 at 0.24 and 2 at 0.47) and usually have a
    fraction of the error. Both errors are the conv's own (linear) output NMSE from the same calibration
    statistics.
    """
    curves, counted, _absolute = costing_pixels(plans)  # the allocation's units

    def pixels(plan: LayerPlan) -> int:
        return counted[plan.output]

    def cost(plan: LayerPlan, decision: Decision) -> int:
        if decision.rank is None:
            return plan.macs_per_pixel_before * pixels(plan)
        return plan.macs_per_pixel_at(min(decision.rank, plan.full_rank), decision.form) * pixels(plan)

    before = sum(p.macs_per_pixel_before * pixels(p) for p in curves)
    after = sum(cost(p, decisions.layers.get(p.output, Decision(None))) for p in curves)
    left = target * before - after
    offered = 0
    for plan in curves:
        decision = decisions.layers.get(plan.output)
        layer = plan.layer_error_at_rank if plan.layer_error_at_rank is not None else plan.error_at_rank
        if (
            decision is None or decision.rank is None or decision.form == FORM_PROJECTED or plan.graph != "main"
            or not plan.projected_error_at_rank or plan.error_source not in ("calibration", "model outputs")
        ):  # fmt: skip
            continue
        rank = min(decision.rank, plan.full_rank)
        separable_error = layer[rank - 1] if rank <= len(layer) else math.inf
        allowance = cost(plan, decision) + max(left, 0.0)
        options = [
            (error, k) for k, error in enumerate(plan.projected_error_at_rank, start=1)
            if math.isfinite(error) and plan.macs_per_pixel_at(k, FORM_PROJECTED) * pixels(plan) <= allowance
        ]  # fmt: skip
        if not options or min(options)[0] >= separable_error:
            continue
        error, k = min(options)
        chosen = Decision(k, form=FORM_PROJECTED, replaces=decision)
        left -= cost(plan, chosen) - cost(plan, decision)
        decisions.layers[plan.output] = chosen
        offered += 1
        decisions.notes.append(
            f"{plan.node or plan.output}: input-projected rank {k} instead of separable rank {rank} "
            f"(layer NMSE {error:.3g} against {separable_error:.3g}, at {plan.macs_per_pixel_at(k, FORM_PROJECTED)} "
            f"MACs per output pixel against {plan.macs_per_pixel_at(rank)})"
        )
    if offered and before:
        # The allocation's own note gave the ratio before the offer.
        decisions.notes.append(f"after the input-projected offer: eligible MACs {(target * before - left) / before:.3f} of the original")


def choose_strategy(options) -> Strategy:
    """The strategy a :class:`~dsrewrite.options.RewriteOptions` asks for."""
    decompose, latency = options.decompose, options.latency
    if decompose.plan is not None:
        strategy: Strategy = SavedPlan(decompose.load_plan())
    elif decompose.target_latency is not None:
        return LatencyBudget(decompose.target_latency)
    elif decompose.target_macs is not None:
        return MacBudget(decompose.target_macs, latency_aware=options.uses_latency(), threads=latency.threads)
    elif decompose.rank == "auto" and options.measures_error_curves():
        strategy = CalibratedAuto(decompose.max_error)
    elif decompose.rank == "auto":
        strategy = DataFreeAuto(decompose.max_error)
    else:
        strategy = UniformRank(decompose.rank)
    return NeverSlower(strategy, latency.threads) if options.uses_latency() else strategy


# -- applying decisions to the plans ------------------------------------------------------------


def apply_decisions(plans: Sequence[LayerPlan], decisions: Decisions) -> None:
    """Write each eligible conv's decision into its plan: rank, form, costs after, weight error, latency."""
    for plan in eligible(plans):
        decision = decisions.layers.get(plan.output) or Decision(None, decisions.default_reason)
        if decision.latency_ms is not None:
            plan.latency_before_ms = decision.latency_ms[0]
        if decision.rank is None:
            revert(plan, decision.reason or decisions.default_reason)
            continue
        rank = min(int(decision.rank), plan.full_rank)
        info = plan.analysis
        projected = decision.form == FORM_PROJECTED and plan.projection_macs_per_pixel is not None
        if projected:
            after = projected_cost(
                plan.in_channels, plan.out_channels, info.kernel_size, rank, plan.projection_macs_per_pixel,
                info.output_pixels, info.has_bias,
            )  # fmt: skip
        else:
            after = separable_cost(
                plan.in_channels, plan.out_channels, info.kernel_size, plan.group, rank, info.output_pixels, info.has_bias
            )
        plan.status, plan.rank, plan.reason = REWRITTEN, rank, None
        forms = valid_forms(rank, plan.group)
        if projected:
            plan.form = FORM_PROJECTED
        else:
            plan.form = decision.form if decision.form in forms else default_form(rank, plan.group)
        plan.macs_after = after.macs
        plan.macs_per_pixel_after = after.macs_per_pixel
        plan.params_after = after.params
        plan.weight_error = None if projected else info.kernel_errors[rank]
        if plan.layer_error_at_rank is not None and not projected:  # the curve is output-level: this conv alone at its rank
            error = plan.error_at_rank[rank - 1] if rank <= len(plan.error_at_rank) else math.inf
            plan.model_output_error = error if math.isfinite(error) else None
        if decision.latency_ms is not None:
            plan.latency_after_ms = decision.latency_ms[1]
        if rank == plan.full_rank and after.macs_per_pixel >= plan.macs_per_pixel_before:
            plan.notes.append(FULL_RANK_SAVES_NOTHING)


FULL_RANK_SAVES_NOTHING = "full rank is exact but saves no MACs"


def revert(plan: LayerPlan, reason: str) -> None:
    """Leave a conv alone: the plan takes the original's costs and ``reason`` (a fresh one, or one decided before)."""
    plan.status, plan.rank, plan.form, plan.reason = SKIPPED, None, None, reason
    plan.macs_after, plan.params_after, plan.macs_per_pixel_after = plan.macs_before, plan.params_before, plan.macs_per_pixel_before
    plan.weight_error = None
    plan.model_output_error = None
    plan.latency_after_ms = None
    plan.notes = [note for note in plan.notes if note != FULL_RANK_SAVES_NOTHING]


# -- MAC budgets and sweeps ---------------------------------------------------------------------

SWEEP_TARGETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _estimated_error(plans: Sequence[LayerPlan], decisions: Decisions) -> float:
    """The sum of the decided ranks' errors on ``plans``' curves (inf where a curve has no finite error there)."""
    total = 0.0
    for plan in plans:
        decision = decisions.layers.get(plan.output)
        if decision is not None and decision.rank is not None and plan.error_at_rank:
            total += plan.error_at_rank[min(decision.rank, len(plan.error_at_rank)) - 1]
    return total


def budget_decisions(
    plans: Sequence[LayerPlan], target: float, fill_plans: Sequence[LayerPlan] | None = None, where: str | None = None
) -> Decisions:
    """Allocate ranks so the eligible convs keep at most ``target`` of their MACs.

    ``fill_plans`` (copies of ``plans`` with more ranks allowed) are used to spend what the
    first allocation left of the budget (see :func:`~dsrewrite.budget.allocate`). ``where``: the
    timings ``plans`` were filtered by, if any (it changes why a budget cannot be met).
    """
    curves, absolute = curves_from_plans(plans)
    fill = curves_from_plans(fill_plans)[0] if fill_plans is not None else None
    if fill is not None and [c.key for c in fill] != [c.key for c in curves]:
        fill = None
    allocation = allocate(curves, target, fill)
    notes = [
        f"--target-macs {target:g}: eligible MACs {allocation.ratio:.3f} of the original "
        f"(estimated total NMSE {allocation.estimated_error:.4g}, errors from {_sources(plans)})"
    ]
    if not absolute:
        notes.append("MAC budget allocated per output pixel: some spatial dims are unknown")
    if curves and allocation.ratio < target * 0.98:
        notes.append(f"the budget could not be met within 2%: ranks are discrete (closest: {allocation.ratio:.3f})")
    if curves and allocation.ratio > target * (1 + 1e-9):
        if where is None:
            notes.append(f"the budget cannot be met even at rank 1 everywhere (best: {allocation.ratio:.3f})")
        else:
            notes.append(
                f"the budget cannot be met with ranks that are faster than their convs in {where} "
                f"(best: {allocation.ratio:.3f}); --no-latency-aware would meet it with slower ones"
            )
    return _from_ranks(allocation.ranks, "left unrewritten by the MAC budget: cheaper error elsewhere", notes)


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


def _from_ranks(ranks: dict[str, int | None], reason: str, notes: list[str]) -> Decisions:
    return Decisions({key: Decision(r, None if r is not None else reason) for key, r in ranks.items()}, notes)


def _sources(plans: Sequence[LayerPlan]) -> str:
    return ", ".join(sorted({p.error_source for p in plans if p.eligible and p.error_source})) or "none"


def _copies(plans: Sequence[LayerPlan]) -> list[LayerPlan]:
    """Plans whose error curves can be edited without touching the originals (the report shows those)."""
    return [replace(p, error_at_rank=list(p.error_at_rank or [])) for p in plans]


# -- latency ------------------------------------------------------------------------------------


def restrict_to_efficient_ranks(plans: Sequence[LayerPlan], timings: dict[str, "RankTimings"], efficiency: float) -> int:
    """Take out of each conv's error curve the ranks that do not pay in time; return how many.

    A rank stays only if, as timed, it is faster than the conv by ``MIN_SPEEDUP`` and
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
            predicted = 1.0 - plan.macs_per_pixel_at(r) / plan.macs_per_pixel_before
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


def _time_curve(plan: LayerPlan, timing: "RankTimings") -> ErrorCurve:
    """The conv's error curve with time (ns, integral like MACs) in place of MACs; slower ranks left out."""
    full = len(plan.error_at_rank)
    cost = [0] * (full + 1)
    errors = [0.0] + [float("inf")] * full
    for rank, (_form, ms) in timing.best.items():
        if ms * MIN_SPEEDUP <= timing.original_ms and math.isfinite(plan.error_at_rank[rank - 1]):
            cost[rank] = int(ms * 1e6)
            errors[rank] = plan.error_at_rank[rank - 1]
    top = max([r for r in range(1, full + 1) if math.isfinite(errors[r])], default=0)
    return ErrorCurve(plan.output, int(timing.original_ms * 1e6), tuple(cost[: top + 1]), tuple(errors[: top + 1]))


def _attach_timings(decisions: Decisions, timings: dict[str, "RankTimings"]) -> None:
    """The fastest form and the (original, rewrite) times of each decided conv that was timed."""
    for key, decision in decisions.layers.items():
        timing = timings.get(key)
        if timing is None:
            continue
        if decision.rank is not None and decision.rank in timing.best:
            form, ms = timing.best[decision.rank]
            decisions.layers[key] = replace(decision, form=form, latency_ms=(timing.original_ms, ms))
        else:
            decisions.layers[key] = replace(decision, latency_ms=(timing.original_ms, None))
