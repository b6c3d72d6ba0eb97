"""Convs timed in place: inside the whole model, in the precision it will run in, at every thread count that counts.

A conv timed alone misses what the model around it does: onnxruntime's NCHWc layout chains, Conv + activation and
Conv + Add fusions, cache effects of the tensors before and after it. On the PP-OCR detector one conv took 5.9 ms
quantized alone and 18.3 ms inside the quantized model, so rewrites that pay in place were judged slower.

:class:`InPlaceTimer` answers the same questions as the per-conv :class:`~dsrewrite.measure.ConvTimer` (a rank ladder
per conv, or each conv at one rank), but from onnxruntime profiles of whole models: the original once, then one model
per ladder rank with every conv that has that rank rewritten at it. Each profiled node's kernel time is attributed
back to the conv it came from (:func:`in_model_times`). The emission form of each (conv, rank) is the one the per-conv
timing found fastest: forms are a local matter, whether a rank pays is not. A conv the profile cannot tell apart keeps
its per-conv timings.

With more than one thread count (``--threads`` and the machine's core count) a rank counts only if it pays at each.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import onnx

from . import latency
from .measure import ConvTimer, RankTimings
from .plan import Decision, Decisions, LayerPlan

if TYPE_CHECKING:
    from .context import RewriteContext

log = logging.getLogger(__name__)

# At most this many whole models are profiled per ladder (besides the original); ranks are spread over the ladder.
MAX_LADDER_MODELS = 8
# Profile runs per model: as many as fit in this many seconds, within RUNS.
PROFILE_SECONDS = 1.0
RUNS = (3, 20)


class InPlaceTimer:
    """Rank ladders and at-rank timings of convs inside the whole (deployed) model."""

    def __init__(self, ctx: "RewriteContext", alone: ConvTimer, threads: int):
        # One thread count, --threads: whether the model gets slower at the core count is the in-model check's
        # question, about all the rewrites together (stages.check_in_model).
        self.ctx, self.alone = ctx, alone
        self.threads = threads
        self.precision = alone.precision
        self._original: dict[str, float] | None = None
        self._runs: int | None = None

    def ladders(self, plans: Sequence[LayerPlan]) -> dict[str, RankTimings]:
        alone = self.alone.ladders(plans)
        ranks = spread(sorted({r for t in alone.values() for r in t.best}), MAX_LADDER_MODELS)
        assignments = [{key: (r, t.best[r][0]) for key, t in alone.items() if r in t.best} for r in ranks]
        return self._in_place(plans, alone, assignments, "timing candidate ranks in the whole model")

    def at_ranks(
        self, plans: Sequence[LayerPlan], ranks: dict[str, int], forms: dict[str, list[str]] | None = None
    ) -> dict[str, RankTimings]:
        alone = self.alone.at_ranks(plans, ranks, forms)
        assignment = {key: (ranks[key], t.best[ranks[key]][0]) for key, t in alone.items()}
        return self._in_place(plans, alone, [assignment], "timing convs in the whole model")

    def _in_place(
        self, plans: Sequence[LayerPlan], alone: dict[str, RankTimings], assignments: list[dict], label: str
    ) -> dict[str, RankTimings]:
        if not alone or not any(assignments):
            return alone
        progress = self.ctx.progress
        original = self._original_times(plans)
        times: dict[str, dict[int, tuple[str, float]]] = {}  # times[key][rank] = (form, ms in place)
        for index, assignment in enumerate(assignments):
            if assignment:
                model, owners = self._candidate(plans, assignment)
                after = self._profile(model, owners, self.threads)
                for key, (rank, form) in assignment.items():
                    if key in after:
                        times.setdefault(key, {})[rank] = (form, after[key])
            if progress:
                progress(label, index + 1, len(assignments))
        result = {}
        for key, timing in alone.items():
            result[key] = self._combine(key, timing, original, times, assignments)
        return result

    def _combine(self, key, timing: RankTimings, original, times, assignments) -> RankTimings:
        """In-place timings of one conv: the original and each rank it was given.

        A conv given no rank here, or that the profile could not attribute (at the original or at any rank it was
        given), keeps ``timing``.
        """
        wanted = {a[key][0] for a in assignments if key in a}
        if not wanted or key not in original or not wanted <= set(times.get(key, {})):
            log.info("%s: not attributable in the profile; keeps its per-conv timing", key)
            return timing
        return RankTimings(original[key], {rank: times[key][rank] for rank in sorted(wanted)}, in_place=True)

    def _original_times(self, plans: Sequence[LayerPlan]) -> dict[str, float]:
        if self._original is None:
            keys = {p.output: p.output for p in plans} | {p.node: p.output for p in plans if p.node}
            self._original = self._profile(self.ctx.deployed_model(), keys, self.threads)
        return self._original

    def _candidate(self, plans: Sequence[LayerPlan], assignment: dict) -> tuple[onnx.ModelProto, dict[str, str]]:
        """The working model with each assigned conv rewritten at its (rank, form), deployed; and its node owners."""
        from .decide import apply_decisions  # noqa: PLC0415

        candidates = [replace(p, notes=list(p.notes)) for p in plans]
        decisions = {p.output: Decision(None, p.reason or "not in this candidate") for p in candidates if p.eligible}
        decisions |= {key: Decision(rank, form=form) for key, (rank, form) in assignment.items()}
        apply_decisions(candidates, Decisions(decisions))
        return timing_candidate(self.ctx, candidates, "in-place timing")

    def _profile(self, model: onnx.ModelProto, owners: dict[str, str], threads: int) -> dict[str, float]:
        feed = self.ctx.one_feed()
        if self._runs is None:  # sized by a short profile of the first model (the original at --threads)
            seconds = sum(ms for _op, ms in latency.node_times(model, feed, threads=threads, runs=RUNS[0]).values()) / 1e3
            self._runs = int(min(max(PROFILE_SECONDS / max(seconds, 1e-6), RUNS[0]), RUNS[1]))
        per_owner, _other = in_model_times(model, latency.node_times(model, feed, threads=threads, runs=self._runs), owners)
        return per_owner


def timing_candidate(ctx, plans: Sequence[LayerPlan], label: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The working model with ``plans`` emitted (data-free factors: speed does not depend on the values) and
    deployed in the precision it will run in; and which conv (by output) owns each emitted node."""
    from .passes import Cleanup, DecomposeConv  # noqa: PLC0415
    from .pipeline import Pipeline  # noqa: PLC0415

    emission = DecomposeConv(plans=plans)
    model = Pipeline([emission, Cleanup()], name=label).run(ctx.model, shapes=ctx.shapes).model
    owners = {name: key for key, names in emission.emitted.items() for name in names}
    return ctx.deploy_candidate(model, owners), owners


def spread(ranks: list[int], limit: int) -> list[int]:
    """At most ``limit`` of the sorted ``ranks``: all of the lowest four, then evenly spread over the rest."""
    if len(ranks) <= limit:
        return ranks
    low, rest = ranks[:4], ranks[4:]
    take = limit - len(low)
    step = len(rest) / take
    return low + [rest[min(int(i * step + step / 2), len(rest) - 1)] for i in range(take)]


# -- attribution of profiled nodes to convs -----------------------------------------------------

# Ops onnxruntime fuses into the conv before them (activations, a constant Mul/Add, Add/Sum in NCHWc). A fused node is
# named after the fused op's output, so its time is walked back to the conv.
FUSED_AFTER_CONV = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Add", "Sum", "Mul", "BatchNormalization"}


def in_model_times(
    model: onnx.ModelProto, times: dict[str, tuple[str, float]], owners: dict[str, str]
) -> tuple[dict[str, float], float]:
    """Profiled node times summed per owner, and what no owner claims (reorders, other ops).

    ``owners`` maps a node's name, or its first output tensor, to its owner (a conv's plan key).
    Profile names are node names; onnxruntime names an NCHWc node ``<output tensor>_nchwc`` and a
    fused QDQ node ``<node name>_token_<n>``.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    by_name = {node.name: node for node in model.graph.node if node.name}
    resolved = {name: _profiled_node(name, by_name, producers) for name in times}
    direct = {owner for node in resolved.values() if (owner := _own(node, owners)) is not None}
    per_owner: dict[str, float] = {}
    other = 0.0
    for name, (_op, ms) in times.items():
        owner = _owner(resolved[name], producers, owners, direct)
        if owner is None:
            other += ms
        else:
            per_owner[owner] = per_owner.get(owner, 0.0) + ms
    return per_owner, other


def _profiled_node(name: str, by_name: dict, producers: dict):
    """The graph node a profile entry stands for, or None."""
    for base in (name, name[: -len("_nchwc")] if name.endswith("_nchwc") else None, _TOKEN.sub("", name)):
        if base and (base in by_name or base in producers):
            return by_name.get(base) or producers[base]
    return None


def _own(node, owners: dict[str, str]) -> str | None:
    if node is None:
        return None
    return owners.get(node.name) if node.name in owners else owners.get(node.output[0]) if node.output else None


def _owner(node, producers, owners, direct, depth: int = 4) -> str | None:
    """The owner of ``node``, walking back through ops fused after a conv."""
    for _ in range(depth):
        if node is None or not node.output:
            return None
        owner = _own(node, owners)
        if owner is not None:
            return owner
        if node.op_type not in FUSED_AFTER_CONV:
            return None
        feeding = [producers[i] for i in node.input if i in producers]
        claimed = [p for p in feeding if _own(p, owners) is not None]
        # Conv + Add fused: the conv that does not also run on its own is the one inside the fused node.
        node = next((p for p in claimed if _own(p, owners) not in direct), claimed[0] if claimed else (feeding or [None])[0])
    return None


_TOKEN = re.compile(r"_token_\d+$")
