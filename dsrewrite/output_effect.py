"""Output-level error: how far the model's own outputs move when one conv is replaced by its fitted factors.

The layer-level error curves (``distill.calibrated_error_curves``) say how well
each conv's factors reproduce that conv's output. They do not say how much the
model's outputs care: an error in a conv whose output is mostly discarded
downstream costs nothing, one before a narrow bottleneck costs a lot. Here each
eligible conv, at each candidate rank, is replaced *alone* by the dense kernel
its calibration-fitted factors compute (``lowrank.reconstruct``, the same
function the separable rewrite computes), and the model's final outputs on a
handful of calibration feeds are compared with the original's.

**Measure**, per float output, on the reference run of the original model:

* the output is a probability distribution over its last axis (every value in
  [0, 1], every last-axis slice sums to 1 within 1e-3, at least 2 classes):
  mean ``KL(p ‖ p̂)`` over those distributions, in nats (the divergence of the
  decisions the model's consumers read);
* otherwise (logits, regressions, maps): relative MSE
  ``Σ‖o − ô‖² / Σ‖o − ō‖²`` (``ō`` the output's mean);
* a relative-MSE output with a **feature axis**: relative MSE per feature (each
  index of that axis against its own spread), averaged over the features. One
  relative MSE over a detection head weighs its values by their spread, so the
  box regressions of thousands of anchors drown the one objectness score that
  decides a detection (``[1, 3549, 4 + 1 + C]`` in YOLOX, ``[N, 4 + C, anchors]``
  in YOLOv8). A feature axis is one the model declares with a fixed size of
  2…``MAX_FEATURES`` that holds at least ``MIN_VALUES_PER_FEATURE`` values per
  index per feed; of several, the one whose indices differ most in spread (a
  head's columns, a map's channels; not its rows).

Several compared outputs: the mean of their measures. ``parts`` keeps them
apart (one per output, one per feature of a featured output): the output guard
bounds each part, since a mean can hide the one that decides. Both are zero at full
rank and grow like the square of a small perturbation, so, like layer NMSEs,
they add across convs to first order: the MAC-budget allocation can spend a
budget on their sum. Non-float outputs are not compared; a model with no float
output, or whose outputs change shape, cannot be measured (:class:`NotComparable`).

**Cost**: every eligible conv's kernel and bias become graph inputs of one copy
of the model, so ONE onnxruntime session serves every (conv, rank) candidate:
each candidate is one run over the probe feeds (batched on axis 0 when the
model's batch dim is dynamic), fed the reconstructed kernel for the conv under
test and the original kernels for the rest.

**Re-measure** (:meth:`OutputProbe.remeasure`): after a first allocation, each
conv's error is measured again around its allocated rank with every *other*
conv at its allocated rank, as the increase over that conv left original: so
interactions (errors that compound or cancel) enter the second allocation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import lowrank
from .calibration import batch_groups
from .fit_store import Fit
from .graph import NameAllocator, constant_value, convs_by_output, declared_dims, export_model
from .plan import LayerPlan

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
Feed = dict[str, np.ndarray]

# Calibration feeds the outputs are compared on: enough to average over inputs, few enough that each
# candidate is one cheap run.
PROBE_FEEDS = 8
# The re-measure round looks this many ranks either side of each conv's allocated rank.
REMEASURE_WIDTH = 2
# A distribution's probabilities are floored here before the logarithm (a rewritten model may output exact zeros).
_PROBABILITY_FLOOR = 1e-12
# A feature axis (see the module docstring): at most this many features, each with this many values per feed.
MAX_FEATURES = 256
MIN_VALUES_PER_FEATURE = 64

SOURCE = "model outputs"  # plans' error_source when their curve is output-level


class NotComparable(Exception):
    """The model's outputs cannot be compared between runs; the reason is the message."""


@dataclass(frozen=True)
class OutputMeasure:
    """How one output is compared: "kl" (a distribution over its last axis) or "relative_mse", maybe per feature."""

    name: str
    kind: str
    scale: float  # relative MSE: Σ‖o − ō‖² of the reference; KL: the number of distributions
    feature_axis: int | None = None  # relative MSE per index of this axis
    feature_scales: tuple[float, ...] = ()  # per feature: Σ‖o_f − ō_f‖² of the reference

    @property
    def scales(self) -> np.ndarray:
        """What each part's divergence is divided by."""
        return np.asarray(self.feature_scales if self.feature_axis is not None else (self.scale,), dtype=np.float64)

    def part_names(self) -> list[str]:
        if self.feature_axis is None:
            return [repr(self.name)]
        return [f"{self.name!r} feature {index} of axis {self.feature_axis}" for index in range(len(self.feature_scales))]

    def describe(self) -> str:
        if self.kind == "kl":
            return f"KL divergence on {self.name!r}"
        if self.feature_axis is not None:
            return (f"relative MSE per feature on {self.name!r} (axis {self.feature_axis}, "
                    f"{len(self.feature_scales)} features, mean)")  # fmt: skip
        return f"relative MSE on {self.name!r}"


def choose_measure(name: str, references: Sequence[np.ndarray], declared: Sequence[int | None] | None = None,
                   feeds: int = 1) -> OutputMeasure:  # fmt: skip
    """KL for an output that is a distribution over its last axis (in every reference batch), relative MSE otherwise.

    ``declared``: the output's dims as the model declares them (None where symbolic or absent), which is where a
    feature axis can be; ``feeds``: how many feeds ``references`` hold.
    """
    arrays = [np.asarray(r, dtype=np.float64) for r in references]

    def distribution(values: np.ndarray) -> bool:
        if values.ndim < 1 or values.shape[-1] < 2 or not values.size:
            return False
        sums = values.sum(axis=-1)
        return values.min() >= -1e-6 and values.max() <= 1 + 1e-6 and bool(np.all(np.abs(sums - 1.0) <= 1e-3))

    if arrays and all(distribution(a) for a in arrays):
        return OutputMeasure(name, "kl", float(sum(a.size // a.shape[-1] for a in arrays)))
    flat = np.concatenate([a.ravel() for a in arrays])
    found = feature_axis(arrays, declared, feeds)
    if found is not None:
        axis, spread = found
        if np.any(spread <= 0):  # a constant feature: relative to its energy, as _spread does for a whole output
            energy = _per_feature_spread(arrays, axis, centred=False)
            spread = np.where(spread > 0, spread, np.where(energy > 0, energy, 1.0))
        return OutputMeasure(name, "relative_mse", _spread(flat), axis, tuple(spread.tolist()))
    return OutputMeasure(name, "relative_mse", _spread(flat))


def feature_axis(
    arrays: Sequence[np.ndarray], declared: Sequence[int | None] | None, feeds: int
) -> tuple[int, np.ndarray] | None:  # fmt: skip
    """The output's feature axis (module docstring) and each feature's spread Σ‖o_f − ō_f‖², or None."""
    if not declared or not arrays:
        return None
    total = sum(a.size for a in arrays)
    candidates = [
        axis for axis, size in enumerate(declared)
        if size is not None and 2 <= size <= MAX_FEATURES and total / size / max(feeds, 1) >= MIN_VALUES_PER_FEATURE
        and all(a.ndim == len(declared) and a.shape[axis] == size for a in arrays)
    ]  # fmt: skip
    if not candidates:
        return None

    spreads = {axis: _per_feature_spread(arrays, axis) for axis in candidates}

    def unevenness(axis: int) -> float:
        return float(spreads[axis].max() / max(spreads[axis].min(), 1e-30))

    axis = max(candidates, key=lambda axis: (unevenness(axis), -axis))
    return axis, spreads[axis]


def _per_feature_spread(arrays: Sequence[np.ndarray], axis: int, centred: bool = True) -> np.ndarray:
    """Per index f of ``axis``: Σ‖o_f − ō_f‖² over every array (``centred=False``: Σ‖o_f‖²); no copy of the whole."""
    def others(a: np.ndarray) -> tuple[int, ...]:
        return tuple(i for i in range(a.ndim) if i != axis)

    def column(values: np.ndarray, a: np.ndarray) -> np.ndarray:
        return values.reshape([-1 if i == axis else 1 for i in range(a.ndim)])

    mean = np.zeros(arrays[0].shape[axis])
    if centred:
        mean = sum(a.sum(axis=others(a)) for a in arrays) / sum(a.size // a.shape[axis] for a in arrays)
    return sum(((a - column(mean, a)) ** 2).sum(axis=others(a)) for a in arrays)


def _spread(values: np.ndarray) -> float:
    """Σ‖o − ō‖²; a constant output's energy instead (1 for an all-zero one), so the measure stays relative."""
    spread = float(np.sum((values - values.mean()) ** 2))
    return spread if spread > 0 else float(np.sum(values**2)) or 1.0


def divergence_parts(measure: OutputMeasure, reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per part (the output, or each feature), the unnormalised measure of one batch (KL summed over distributions,
    or Σ‖o − ô‖²); divide by ``scales``."""
    if candidate.shape != reference.shape:
        raise NotComparable(f"output {measure.name!r} changes shape ({reference.shape} → {candidate.shape})")
    p = reference.astype(np.float64)
    q = candidate.astype(np.float64)
    parts = len(measure.scales)
    if not np.all(np.isfinite(q)):
        return np.full(parts, math.inf)
    if measure.kind == "kl":
        p = np.clip(p, 0.0, None)
        q = np.clip(q, _PROBABILITY_FLOOR, None)
        terms = np.where(p > 0, p * (np.log(np.clip(p, _PROBABILITY_FLOOR, None)) - np.log(q)), 0.0)
        return np.array([max(float(terms.sum()), 0.0)])
    squared = (p - q) ** 2
    if measure.feature_axis is not None:
        return np.moveaxis(squared, measure.feature_axis, -1).reshape(-1, parts).sum(axis=0)
    return np.array([float(squared.sum())])


@dataclass
class OutputProbe:
    """One onnxruntime session of the model with every probed conv's kernel and bias as graph inputs."""

    session: object
    feeds: list[Feed]  # batched probe feeds
    originals: dict[str, tuple[np.ndarray, np.ndarray]]  # conv output -> (kernel, bias) as in the model
    inputs: dict[str, tuple[str, str]]  # conv output -> (kernel input name, bias input name)
    dtypes: dict[str, np.dtype]
    output_names: list[str]
    measures: list[OutputMeasure]
    references: list[list[np.ndarray]]  # per batch, the compared outputs of the original model
    runs: int = 0
    seconds: float = 0.0
    ignored: list[str] = field(default_factory=list)  # outputs not compared (not float)

    @classmethod
    def open(cls, model: onnx.ModelProto, outputs: Iterable[str], feeds: Iterable[Feed], *, threads: int = 1) -> "OutputProbe":
        """Build the probe for the convs writing ``outputs``; :class:`NotComparable` when the outputs cannot be compared."""
        from .calibration import model_inputs  # noqa: PLC0415
        from .verify import session  # noqa: PLC0415

        start = time.perf_counter()
        float_outputs = [
            o.name for o in model.graph.output
            if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
        ]  # fmt: skip
        ignored = [o.name for o in model.graph.output if o.name not in float_outputs]
        if not float_outputs:
            raise NotComparable("no float output to compare (" + ", ".join(repr(n) for n in ignored) + ")")
        feeds = list(feeds)
        probed, originals, inputs, dtypes = _weights_as_inputs(model, set(outputs))
        sess = session(probed, threads=threads)
        can_batch = all(spec.dims and spec.dims[0] is None for spec in model_inputs(model))
        batches = _batched(list(feeds), can_batch)
        weights = {name: value for key in originals for name, value in zip(inputs[key], originals[key])}
        references: list[list[np.ndarray]] = []
        try:
            for batch in batches:
                references.append(sess.run(float_outputs, {**batch, **weights}))
        except Exception:  # noqa: BLE001 - a model that hard-codes batch 1 inside: one feed at a time
            if not can_batch:
                raise
            batches, references = _batched(list(feeds), False), []
            for batch in batches:
                references.append(sess.run(float_outputs, {**batch, **weights}))
        declared = {o.name: declared_dims(o) for o in model.graph.output}
        measures = [choose_measure(name, [r[index] for r in references], declared[name], len(feeds))
                    for index, name in enumerate(float_outputs)]  # fmt: skip
        probe = cls(sess, batches, originals, inputs, dtypes, float_outputs, measures, references, ignored=ignored)
        probe.seconds = time.perf_counter() - start
        return probe

    def describe(self) -> str:
        """The measure in words, for the report's notes."""
        parts = ", ".join(m.describe() for m in self.measures)
        if len(self.measures) > 1:
            parts = f"mean of {parts}"
        if self.ignored:
            parts += " (not compared: " + ", ".join(repr(n) for n in self.ignored) + ", not float)"
        return parts

    def error(self, replaced: Mapping[str, Fit]) -> float:
        """The outputs' measure with the convs in ``replaced`` computing their factors, every other conv original."""
        return self.compare(self.outputs_with(replaced))

    def outputs_with(self, replaced: Mapping[str, Fit]) -> list[list[np.ndarray]]:
        """Per probe batch, the compared outputs with the convs in ``replaced`` computing their factors."""
        start = time.perf_counter()
        weights = {}
        for key, (kernel, bias) in self.originals.items():
            if key in replaced:
                factors, fitted_bias = replaced[key]
                kernel, bias = lowrank.reconstruct(factors).astype(self.dtypes[key]), np.asarray(fitted_bias).astype(self.dtypes[key])
            kernel_name, bias_name = self.inputs[key]
            weights[kernel_name], weights[bias_name] = kernel, bias
        got = [self.session.run(self.output_names, {**batch, **weights}) for batch in self.feeds]
        self.runs += 1
        self.seconds += time.perf_counter() - start
        return got

    def compare(self, outputs: Sequence[Sequence[np.ndarray]]) -> float:
        """The measure of ``outputs`` (per probe batch, the compared outputs in order)."""
        return self.measure_of(self.parts(outputs))

    def measure_of(self, parts: np.ndarray) -> float:
        """The measure from its ``parts``: the mean over outputs of each output's mean over its parts."""
        boundaries = np.cumsum([len(m.scales) for m in self.measures])[:-1]
        return float(np.mean([chunk.mean() for chunk in np.split(np.asarray(parts), boundaries)]))

    def parts(self, outputs: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """Each part's measure (every output's, or each feature's of a featured one), in ``part_names`` order."""
        sums = [np.zeros(len(m.scales)) for m in self.measures]
        for got, reference in zip(outputs, self.references):
            for index, measure in enumerate(self.measures):
                sums[index] += divergence_parts(measure, reference[index], got[index])
        return np.concatenate([total / measure.scales for total, measure in zip(sums, self.measures)])

    def part_names(self) -> list[str]:
        return [name for measure in self.measures for name in measure.part_names()]

    def outputs_of_model(self, model: onnx.ModelProto, *, threads: int = 1) -> list[list[np.ndarray]]:
        """Per probe batch, the compared outputs of another model with the same inputs and outputs (e.g. quantized)."""
        from .verify import session  # noqa: PLC0415

        start = time.perf_counter()
        sess = session(model, threads=threads)
        got = [sess.run(self.output_names, batch) for batch in self.feeds]
        self.seconds += time.perf_counter() - start
        return got

    # -- curves --------------------------------------------------------------------------------

    def curves(self, plans: Sequence[LayerPlan], fits: Mapping[str, Mapping[int, Fit]], progress: Progress | None = None) -> None:
        """Each probed conv's ``error_at_rank`` becomes its output-level curve, measured alone at every fitted rank.

        The layer-level curve is kept in ``layer_error_at_rank`` for the report.
        """
        todo = [p for p in plans if p.output in self.originals and fits.get(p.output)]
        jobs = sum(len(fits[p.output]) for p in todo)
        done = 0
        for plan in todo:
            errors = [math.inf] * len(plan.error_at_rank or [])
            for rank, fit in sorted(fits[plan.output].items()):
                errors[rank - 1] = self.error({plan.output: fit})
                done += 1
                if progress:
                    progress("measuring output-level errors", done, jobs)
            plan.layer_error_at_rank = list(plan.error_at_rank or [])
            plan.error_at_rank = errors
            plan.error_source = SOURCE

    def remeasure(
        self, plans: Sequence[LayerPlan], ranks: Mapping[str, int | None], fits: Mapping[str, Mapping[int, Fit]],
        width: int = REMEASURE_WIDTH,
    ) -> list[LayerPlan]:  # fmt: skip
        """Copies of ``plans`` whose curves are re-measured with every other conv at its rank in ``ranks``.

        For conv ``i`` at rank ``r`` (``REMEASURE_WIDTH`` ranks either side of its
        allocated one; the cheapest few for a conv left alone) the error is
        ``E(others at their ranks, i at r) − E(others at their ranks, i original)``.
        Each conv's other ranks keep their alone-measured errors, scaled up by the
        median ratio of re-measured to alone errors where that exceeds 1 (errors
        that compound). A ratio under 1 is not carried to ranks it was not measured
        at: near full rank a conv's errors can vanish among the others' while a far
        cheaper rank still breaks the model (captcha_crnn's stem: scaled down
        twentyfold, its rank 1 looked cheap and was picked, and the joint error rose
        tenfold).
        """
        base = fits_at_ranks(fits, ranks)
        copies = []
        for plan in plans:
            copy = replace(plan, error_at_rank=list(plan.error_at_rank or []), notes=list(plan.notes))
            copies.append(copy)
            available = sorted(fits.get(plan.output, {}))
            if plan.output not in self.originals or not available or not plan.error_at_rank:
                continue
            allocated = ranks.get(plan.output)
            if allocated is None:
                around = available[: 2 * width + 1]
            else:
                around = [r for r in available if abs(r - allocated) <= width]
            others = {k: v for k, v in base.items() if k != plan.output}
            without = self.error(others)
            ratios = []
            for r in around:
                marginal = max(self.error({**others, plan.output: fits[plan.output][r]}) - without, 0.0)
                alone = plan.error_at_rank[r - 1]
                copy.error_at_rank[r - 1] = marginal
                if alone > 0 and math.isfinite(alone):
                    ratios.append(marginal / alone)
            factor = max(float(np.median(ratios)), 1.0) if ratios else 1.0
            for r in available:
                if r not in around and math.isfinite(plan.error_at_rank[r - 1]):
                    copy.error_at_rank[r - 1] = plan.error_at_rank[r - 1] * factor
        return copies


def fits_at_ranks(fits: Mapping[str, Mapping[int, Fit]], ranks: Mapping[str, int | None]) -> dict[str, Fit]:
    """Each conv's fit at its rank in ``ranks`` (convs left alone, or at a rank without a fit, are omitted)."""
    return {k: fits[k][r] for k, r in ranks.items() if r is not None and r in fits.get(k, {})}


def probe_feeds(calibration: Iterable[Feed], total: int, count: int = PROBE_FEEDS) -> list[Feed]:
    """``count`` feeds spread evenly over the calibration set (one pass, keeping only those)."""
    wanted = set(np.linspace(0, max(total - 1, 0), num=min(count, total)).round().astype(int).tolist())
    return [feed for index, feed in enumerate(calibration) if index in wanted]


def _batched(feeds: list[Feed], can_batch: bool) -> list[Feed]:
    """Feeds of equal shapes concatenated on axis 0 when the batch dim is dynamic, else one by one.

    A batch holds about ``calibration.BATCH_BYTES`` of inputs (``calibration.batch_groups``): onnxruntime's arena
    grows with the batch, and 16 of the PP-OCR detector's 736×736 feeds in one batch took the output guard to 3.8 GB.
    """
    if not can_batch:
        return feeds
    groups = batch_groups(feeds, len(feeds))
    return [{k: np.concatenate([f[k] for f in group], axis=0) for k in group[0]} for group in groups]


def _weights_as_inputs(model: onnx.ModelProto, wanted: set[str]):
    """A copy of ``model`` whose wanted convs read kernel and bias from new graph inputs; and their original values."""
    graph = gs.import_onnx(model)
    names = NameAllocator(graph)
    originals, inputs, dtypes = {}, {}, {}
    for output, node in convs_by_output(graph).items():
        if output not in wanted:
            continue
        kernel = constant_value(node.inputs[1])
        if kernel is None:
            continue
        bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        bias = np.zeros(kernel.shape[0], kernel.dtype) if bias is None else bias.astype(kernel.dtype)
        kernel_in = gs.Variable(names.fresh(f"{output}/probe_W"), dtype=kernel.dtype, shape=list(kernel.shape))
        bias_in = gs.Variable(names.fresh(f"{output}/probe_B"), dtype=kernel.dtype, shape=list(bias.shape))
        node.inputs = [node.inputs[0], kernel_in, bias_in]
        graph.inputs.extend([kernel_in, bias_in])
        originals[output] = (kernel, bias)
        inputs[output] = (kernel_in.name, bias_in.name)
        dtypes[output] = kernel.dtype
    graph.cleanup(remove_unused_graph_inputs=False)
    return export_model(graph, model), originals, inputs, dtypes
