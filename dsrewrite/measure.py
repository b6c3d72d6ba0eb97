"""The measure stage: what the decision strategies need to know before they decide.

* Error curves (``ERROR_CURVES``): each eligible conv's normalised output error
  at every rank, measured on calibration data (each conv fitted alone,
  ``distill.calibrated_error_curves``) and/or as the drop of the user's task
  score (``sensitivity``). They replace the kernel-spectrum curve that the
  analysis wrote into each plan; the report shows what decisions were made from.
* Conv timings (``RANK_LADDERS``): every eligible conv timed alone in
  onnxruntime at its candidate ranks, in every emission form, next to the
  original conv (:class:`ConvTimer`, cached on disk).
* The whole model's latency (``MODEL_TIME``).

With ``--quantize int8`` every timing is of the quantized model or candidate.

A strategy that needs timings of what it decided (``NeverSlower``) asks
``Measured.timer`` for them; everything else is measured here, up front.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import latency
from .cores import available_cores
from .decide import ERROR_CURVES, MODEL_TIME, RANK_LADDERS
from .fit_store import FitStore
from .graph import constant_value, find_conv
from .plan import Decision, Decisions, LayerPlan, valid_forms
from .quantize import quantize_int8, timing_label
from .verify import random_feeds

if TYPE_CHECKING:
    from .context import RewriteContext
    from .in_model import InPlaceTimer

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass
class RankTimings:
    """One conv timed: the original, and the fastest form at each measured rank (ms).

    ``in_place``: timed inside the whole model (``dsrewrite.in_model``), else alone (median ms).
    """

    original_ms: float
    best: dict[int, tuple[str, float]]  # rank -> (form, ms)
    in_place: bool = False

    @classmethod
    def of(cls, times: dict[str, float], ranks: Sequence[int]) -> "RankTimings":
        """From :func:`measure_conv_candidates` times: the fastest form at each rank (ties: form name)."""
        best = {}
        for rank in ranks:
            options = [(k.split(":", 1)[1], v) for k, v in times.items() if k.startswith(f"{rank}:")]
            best[rank] = min(options, key=lambda kv: (kv[1], kv[0]))
        return cls(times["original"], best)

    def realised(self, rank: int) -> float:
        """Fraction of the conv's time the rewrite at ``rank`` saves (negative: slower)."""
        return 1.0 - self.best[rank][1] / self.original_ms


@dataclass
class OutputLevel:
    """The output probe and the fitted factors of every eligible conv at every candidate rank."""

    probe: object  # output_effect.OutputProbe
    fits: Mapping  # conv output -> rank -> (factors, bias), e.g. a FitStore

    def remeasure(self, plans: Sequence[LayerPlan], ranks: dict[str, int | None]) -> list[LayerPlan]:
        return self.probe.remeasure(plans, ranks, self.fits)

    def joint_error(self, ranks: dict[str, int | None]) -> float:
        """The outputs' error with every conv at its rank in ``ranks`` at once (one probe run)."""
        from .output_effect import fits_at_ranks  # noqa: PLC0415

        return self.probe.error(fits_at_ranks(self.fits, ranks))

    def cost(self) -> str:
        return f"{self.probe.runs} runs, {self.probe.seconds:.1f} s"


@dataclass
class Measured:
    """What the measure stage found; ``timer`` measures more on request."""

    timer: "ConvTimer | InPlaceTimer"
    ladders: dict[str, RankTimings] = field(default_factory=dict)
    model_ms: float | None = None
    # Output-level error curves (allocate by the model's outputs): the probe that measures them and the
    # calibration fits it feeds, for a strategy's re-measure round; None when the curves are layer-level.
    outputs: OutputLevel | None = None

    @property
    def where(self) -> str:
        """Where the timings come from, for the report: "onnxruntime" or e.g. "onnxruntime, INT8"."""
        return timing_label(self.timer.precision)

    def describe(self, timings: dict[str, RankTimings]) -> str:
        """How ``timings`` were measured, for the notes: "3 conv(s) timed in onnxruntime: 2 in place ... 1 alone"."""
        in_place = sum(t.in_place for t in timings.values())
        threads = f"{self.timer.threads} thread(s)"
        if in_place == len(timings):
            how = f"in place in the whole model (profiled at {threads})"
        elif in_place == 0:
            how = f"alone ({threads})"
        else:
            how = f"{in_place} in place in the whole model (profiled at {threads}), {len(timings) - in_place} alone"
        return f"{len(timings)} conv(s) timed in {self.where}, {how}"


def measure(ctx: "RewriteContext", plans: Sequence[LayerPlan], needs: frozenset[str]) -> Measured:
    """Make the measurements in ``needs``; error curves are written into ``plans``."""
    precision = ctx.options.deploy.quantize
    timer = ConvTimer(
        ctx.model, ctx.shapes, ctx.latency_cache(), threads=ctx.options.latency.threads, progress=ctx.progress,
        precision=precision,
    )  # fmt: skip
    if ctx.options.latency.in_place:
        from .in_model import InPlaceTimer  # noqa: PLC0415

        timer = InPlaceTimer(ctx, timer, ctx.options.latency.threads)  # at --threads only (see InPlaceTimer)
    measured = Measured(timer)
    if MODEL_TIME in needs:
        session = latency.make_session(ctx.deployed_model(), ctx.options.latency.threads)
        (times,) = latency.interleaved_medians([session], ctx.one_feed(), budget_seconds=1.0)
        measured.model_ms = latency.Timing.of(times).median_ms
    if RANK_LADDERS in needs:
        # Before the error curves: the ladders' whole-model profiles are the run's largest sessions, and the
        # curves leave the output probe alive until the decision (VGG16: 0.3 GB lower this way). The ranks timed
        # are those that save MACs, which the data-free curves already say.
        measured.ladders = timer.ladders(plans)
    if ERROR_CURVES in needs:
        measured.outputs = measure_error_curves(ctx, plans)
    return measured


def measure_error_curves(ctx: "RewriteContext", plans: Sequence[LayerPlan]) -> "OutputLevel | None":
    """Calibration-data curves when there is data, then task-sensitivity curves when there is an evaluation.

    Under a MAC budget with calibration data (and no evaluation), the calibration curves are then replaced by
    output-level ones (``output_effect``), unless ``allocate_by="layer"`` or the outputs cannot be compared.
    """
    from .distill import calibrated_error_curves  # noqa: PLC0415
    from .sensitivity import measure_sensitivity  # noqa: PLC0415

    options = ctx.options
    decompose = options.decompose
    output_level = (
        ctx.calibration is not None and decompose.target_macs is not None and decompose.evaluate is None
        and decompose.allocate_by == "output"
    )  # fmt: skip
    fits = FitStore() if output_level else None  # in files until the probe reads them: 220 MB for VGG16
    outputs = None
    if ctx.calibration is not None:
        calibrated_error_curves(
            ctx.model, plans, ctx.calibration, options.calibration.fit_options(options.seed), ctx.progress, fits=fits
        )  # fmt: skip
    if output_level:
        outputs = measure_output_curves(ctx, plans, fits)
    if decompose.evaluate is not None:
        measure_sensitivity(
            ctx.model, plans, decompose.evaluate, cache_path=decompose.sensitivity_cache_path(),
            cache_key=decompose.eval_key, progress=ctx.progress,
        )  # fmt: skip
    return outputs


def measure_output_curves(ctx: "RewriteContext", plans: Sequence[LayerPlan], fits: dict) -> "OutputLevel | None":
    """Output-level error curves from the calibration fits; None (with a note) when the outputs cannot be compared."""
    from .output_effect import NotComparable, OutputProbe, probe_feeds  # noqa: PLC0415

    keys = [p.output for p in plans if p.eligible and p.graph == "main" and fits.get(p.output)]
    if not keys:
        return None
    feeds = probe_feeds(ctx.calibration, len(ctx.calibration))
    try:
        probe = OutputProbe.open(ctx.model, keys, feeds, threads=available_cores())
        probe.curves(plans, fits, ctx.progress)
    except NotComparable as exc:
        for plan in plans:  # a curve half replaced goes back to its layer-level values
            if plan.layer_error_at_rank is not None:
                plan.error_at_rank, plan.layer_error_at_rank, plan.error_source = plan.layer_error_at_rank, None, "calibration"
        ctx.notes.append(f"allocated on layer-level errors: the model's outputs cannot be compared ({exc})")
        return None
    ctx.notes.append(
        f"errors for the allocation: the model's outputs with one conv at a time replaced by its fitted factors, "
        f"{probe.describe()}, on {len(feeds)} calibration feed(s) ({probe.runs} runs, {probe.seconds:.1f} s)"
    )
    return OutputLevel(probe, fits)


class ConvTimer:
    """Times convs of ``model`` alone in onnxruntime, at their input shapes, against their rewrites.

    ``precision="int8"``: every candidate (the original conv too) is timed after QDQ INT8 quantization.
    """

    def __init__(
        self, model: onnx.ModelProto, shapes: dict, cache: latency.LatencyCache, *, threads: int,
        progress: Progress | None, precision: str | None = None,
    ):  # fmt: skip
        self.model, self.shapes, self.cache = model, shapes, cache
        self.threads, self.progress, self.precision = threads, progress, precision
        self._conv_inputs: dict[str, str] | None = None
        self._graph: gs.Graph | None = None

    def ladders(self, plans: Sequence[LayerPlan]) -> dict[str, RankTimings]:
        """Every eligible main-graph conv at every candidate rank (up to 10), in every form."""
        timings = {}
        todo = [p for p in plans if p.eligible and p.graph == "main" and p.error_at_rank]
        for index, plan in enumerate(todo):
            shape = self.input_shape(plan)
            ranks = plan.candidate_ranks(limit=10)
            if shape is not None and ranks:
                timings[plan.output] = RankTimings.of(self.candidates(plan, shape, ranks), ranks)
            if self.progress:
                self.progress("timing candidate ranks", index + 1, len(todo))
        self.cache.save()
        return timings

    def at_ranks(
        self, plans: Sequence[LayerPlan], ranks: dict[str, int], forms: dict[str, list[str]] | None = None
    ) -> dict[str, RankTimings]:
        """Each conv at one rank (``ranks[output]``), in every form (or ``forms[output]``); convs of unknown input
        shape are left out."""
        timings = {}
        for index, plan in enumerate(plans):
            shape = self.input_shape(plan)
            if shape is None:
                log.info("%s: input shape unknown, latency not measured", plan.node)
                continue
            rank = ranks[plan.output]
            chosen = (forms or {}).get(plan.output)
            timings[plan.output] = RankTimings.of(self.candidates(plan, shape, [rank], chosen), [rank])
            if self.progress:
                self.progress("timing convs", index + 1, len(plans))
        self.cache.save()
        return timings

    def input_shape(self, plan: LayerPlan) -> list[int] | None:
        """The conv's input shape at the analysed shapes, when every dim is known (main graph only)."""
        if self._conv_inputs is None:
            self._conv_inputs = {n.output[0]: n.input[0] for n in self.model.graph.node if n.op_type == "Conv" and n.output}
        if plan.output not in self._conv_inputs:
            return None
        shape = self.shapes.get(self._conv_inputs[plan.output])
        if shape is None or any(d is None for d in shape):
            return None
        return [int(d) for d in shape]

    def candidates(
        self, plan: LayerPlan, input_shape: Sequence[int], ranks: Sequence[int], forms: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Median ms of the original conv ("original") and of each "rank:form" rewrite of it (every valid form, or
        ``forms``)."""
        from .decide import apply_decisions  # noqa: PLC0415
        from .passes import AnalyseConvs, Cleanup, DecomposeConv  # noqa: PLC0415
        from .pipeline import Pipeline  # noqa: PLC0415

        if self._graph is None:  # imported once per timer, not once per timed conv
            self._graph = gs.import_onnx(self.model)
        single = single_conv_model(self.model, plan.output, input_shape, graph=self._graph)
        layer_key = {
            "kernel": plan.kernel, "in": plan.in_channels, "out": plan.out_channels, "group": plan.group,
            "input_shape": list(input_shape), "attrs": {a.name: str(onnx.helper.get_attribute_value(a)) for a in single.graph.node[0].attribute},
            "dtype": str(single.graph.input[0].type.tensor_type.elem_type),
        }  # fmt: skip
        if self.precision is not None:
            layer_key["precision"] = self.precision
        names = ["original"] + [f"{rank}:{form}" for rank in ranks for form in (forms or valid_forms(rank, plan.group))]
        cached = latency.cached_times(names, layer_key, self.cache, threads=self.threads)
        if cached is not None:  # nothing to build, emit or quantize
            return cached
        models = {"original": single}
        (analysed,) = Pipeline([AnalyseConvs()]).inspect(single)[0].facts  # one SVD serves every candidate
        for name in names[1:]:
            rank, form = name.split(":")
            candidate = replace(analysed, notes=[])
            apply_decisions([candidate], Decisions({plan.output: Decision(int(rank), form=form)}))
            models[name] = Pipeline([DecomposeConv(plans=[candidate]), Cleanup()]).run(single).model
        if self.precision is not None:  # calibrated on random feeds: a candidate's speed does not depend on its ranges
            feeds = [random_feeds(single, {"x": input_shape}, seed) for seed in range(4)]
            models = {name: quantize_int8(candidate, feeds) for name, candidate in models.items()}
        return latency.measure_layer(models, input_shape, layer_key, self.cache, threads=self.threads)


def single_conv_model(
    model: onnx.ModelProto, output: str, input_shape: Sequence[int], graph: gs.Graph | None = None
) -> onnx.ModelProto:
    """A model holding only the conv that writes ``output``, fed at ``input_shape``.

    ``graph``: ``model`` already imported into onnx-graphsurgeon (it is only read).
    """
    from .graph import ConvSpec, export_model  # noqa: PLC0415

    graph = gs.import_onnx(model) if graph is None else graph
    node = find_conv(graph, output)
    weight = constant_value(node.inputs[1])
    spec = ConvSpec.from_node(node, graph, {node.inputs[0].name: tuple(input_shape)})
    x = gs.Variable("x", dtype=weight.dtype, shape=list(input_shape))
    y = gs.Variable(output, dtype=weight.dtype, shape=[input_shape[0], weight.shape[0], *spec.output_spatial])
    inputs = [x, gs.Constant("W", weight)]
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_value(node.inputs[2])
        inputs.append(gs.Constant("B", bias if bias is not None else np.zeros(weight.shape[0], weight.dtype)))
    conv = gs.Node("Conv", node.name or "conv", dict(node.attrs), inputs, [y])
    single = gs.Graph(nodes=[conv], inputs=[x], outputs=[y], opset=graph.opset)
    return export_model(single, model)
