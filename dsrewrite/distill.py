"""Fit the separable factors of the planned convs to calibration data.

For each conv planned for rewriting (its rank fixed by the plan) we stream the
second moments of its input patches and original outputs through onnxruntime
(``calibration.RegressionAccumulator``), then fit in closed form
(``lowrank.fit_separable``): whitened per-channel SVD, then alternating
least squares of the pointwise weights + bias and of each channel's depthwise
filters, all against the original layer's output.

**Sequential mode** (the default) fits convs in waves. Wave ``w`` holds the
convs with ``w`` planned convs on the longest path above them. A wave's inputs
come from the model in which every earlier wave is already replaced by its
fitted factors; its targets come from the original model. So each layer learns
to undo the error of the layers before it, and errors do not pile up. One pass
over the calibration data serves every conv of a wave.

**Independent mode** fits every conv on the original model's inputs in one pass.

**Activation-aware** (the default): when a conv's output feeds an elementwise
activation through per-channel affine ops (``activation_match``), the linear fit
is refined so the *activated* output matches the original's
(``activation_fit``, Zhang et al. 2015's alternating scheme). It needs a bounded
uniform sample of positions (``calibration.RowSample``, float32): at most
``ACTIVATION_SAMPLE_ROWS`` rows per conv and ``ACTIVATION_SAMPLE_BYTES`` for all
convs of a wave together. The refined fit is kept only if it lowers the
activated error on that sample; the plan says which fit was used.

**Through a following depthwise conv** (the default): when a conv's output reaches a depthwise conv with
nothing nonlinear between (``following_depthwise``), the conv is fitted at that conv's output instead, where
its error meets the next nonlinearity (``composed_fit``): the target captured is the depthwise conv's output,
the patches are those of the composed kernel, and only positions where the depthwise conv reads no padding
are sampled. The error curves (``calibrated_error_curves``) use the same fit, so the allocation sees it too.

Cost: one pass over the calibration data through the original model (it
captures the first wave's inputs and every wave's targets at their sampled
positions, which are spilled to a temporary directory), then one pass through
the partly rewritten model per later wave. Memory: one batch of captured
activations, plus per conv ``g·(F+1)² + N·(F+1)`` float64 numbers
(``F = (M/g)·K``), independent of the number of samples, plus the activation
sample (at most ``ACTIVATION_SAMPLE_BYTES`` per wave); disk: the sampled
targets, ``N`` float32 numbers per sampled position.

Convs inside subgraphs cannot be captured as graph outputs; they keep the
data-free factorisation, and their plan says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, MutableMapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import lowrank
from .activation_fit import Activation, fit_activated
from .activation_match import match_activation
from .composed_fit import MAX_WORK, composed_geometry, fit_through, interior_positions, to_composed_positions, work
from .calibration import (
    CalibrationSet,
    RegressionAccumulator,
    RowSample,
    capture,
    extract_patches,
    flatten_output,
    positions_per_feed,
    sample_positions,
)
from .cost import separable_cost
from .following_depthwise import FollowingDepthwise, match_following_depthwise
from .graph import ConvSpec, convs_by_output, with_dense_kernels
from .heap import release_free_memory
from .plan import FORM_PROJECTED, THROUGH_FIT_NOTE, LayerPlan
from .projection import ProjectedFactors, data_free_projected, fit_projected

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DistillOptions:
    sequential: bool = True
    whiten: bool = True
    refit: bool = True  # pointwise/bias least squares (and the ALS rounds)
    rounds: int = 4  # alternating depthwise/pointwise rounds after the first pointwise solve
    ridge: float = 1e-5
    seed: int = 0
    activation_aware: bool = True  # refine towards the activated output where an activation follows
    activation_iterations: int = 3
    through_depthwise: bool = True  # fit a conv that reaches a depthwise conv linearly at that conv's output


PROJECTED_FIT_NOTE = "input-projected rewrite: fitted to the conv's own output (tied weights, no refinement)"

# The activation-aware refinement's in-memory sample: rows per conv, and bytes for all convs of a wave.
ACTIVATION_SAMPLE_ROWS = 16384
ACTIVATION_SAMPLE_BYTES = 256 * 2**20
# Fewer rows than this (a very wide conv in a crowded wave) and the correction term is too noisy to trust.
ACTIVATION_MIN_ROWS = 1024


@dataclass
class FittedLayer:
    """The fitted factors of one conv (keyed by its output tensor name) and what they achieve."""

    factors: lowrank.SeparableFactors
    bias: np.ndarray
    weight_error: float
    output_error: float  # NMSE against the original layer output, on the inputs it was fitted on
    output_error_data_free: float  # the same for the plain SVD factors
    seconds: float
    wave: int
    method: str
    activation: str | None = None  # the activation the output feeds (its graph pattern), if any
    objective: str = "linear"  # "activated": the activation-aware refinement was kept; "linear": the linear fit
    activated_error: float | None = None  # NMSE of the activated output on the sample, of the factors used
    activated_error_linear: float | None = None  # the same for the linear fit
    note: str | None = None  # why there was no activation-aware refinement
    projected: ProjectedFactors | None = None  # the input-projected rewrite's own factors (``factors``: as separable)


@dataclass
class _Target:
    plan: LayerPlan
    spec: ConvSpec
    x_name: str
    y_name: str
    wave: int = 0
    seconds: float = 0.0
    activation: Activation | None = None
    activation_reason: str | None = None  # why there is no activation to fit through
    through: FollowingDepthwise | None = None  # fitted at this depthwise conv's output instead of its own

    @property
    def target_name(self) -> str:
        """The original tensor the fit matches: the conv's output, or the following depthwise conv's."""
        return self.through.output if self.through is not None else self.y_name

    @property
    def sampled(self) -> list[str]:
        """The original tensors read at sampled positions: the target, and for a composed fit the conv's own
        output too (its shape places the depthwise conv's borders)."""
        return [self.target_name, self.y_name] if self.through is not None else [self.y_name]

    @property
    def taps(self) -> int:
        """Kernel taps of the patches fitted: the conv's own, or the composed kernel's."""
        return self.through.composed_taps if self.through is not None else self.spec.kernel_size

    @property
    def features(self) -> int:
        """Patch values per group (``F``), what the statistics' size and the positions sampled follow."""
        return self.spec.in_channels // self.spec.group * self.taps

    def accumulator(self) -> RegressionAccumulator:
        return RegressionAccumulator(self.spec.in_channels, self.spec.out_channels, self.taps, self.spec.group)

    def patches(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The input patches at target ``positions``: the conv's own, or the composed kernel's."""
        if self.through is None:
            return extract_patches(x, self.spec.geometry, positions).astype(np.float64)
        geometry, _, z = composed_geometry(self.spec.geometry, self.through.geometry, x.shape[2:])
        composed = to_composed_positions(positions, z, geometry.output_spatial(x.shape[2:]))
        return extract_patches(x, geometry, composed).astype(np.float64)


def describe(options: DistillOptions) -> str:
    parts = ["whitened SVD" if options.whiten else "SVD"]
    if options.refit:
        parts.append("pointwise refit")
    if options.refit and options.rounds:
        parts.append(f"{options.rounds} ALS rounds")
    if options.refit and options.activation_aware:
        parts.append("activation-aware")
    return " + ".join(parts) + (" (sequential)" if options.sequential else " (independent)")


def distill(
    model: onnx.ModelProto,
    plans: Sequence[LayerPlan],
    calibration: CalibrationSet,
    options: DistillOptions = DistillOptions(),
    progress: Progress | None = None,
) -> dict[str, FittedLayer]:
    """Fit every rewritten main-graph conv of ``plans``; return ``{output tensor name: FittedLayer}``."""
    graph = gs.import_onnx(model)
    targets = _targets(graph, plans, through=options.refit and options.through_depthwise)
    if not targets:
        return {}
    if options.sequential:
        _assign_waves(graph, targets)
    rng = np.random.default_rng(options.seed)
    method = describe(options)

    fitted: dict[str, FittedLayer] = {}
    waves = sorted({t.wave for t in targets})
    with tempfile.TemporaryDirectory(prefix="dsrewrite-targets-") as spill:
        current = model
        for w in waves:
            wave = [t for t in targets if t.wave == w]
            later = [t for t in targets if t.wave > w] if w == waves[0] else []
            accumulators = {t.y_name: t.accumulator() for t in wave}
            samples = _row_samples(wave, options, rng)
            if w == waves[0]:
                # One pass over the original model: wave 0's inputs and targets, and the targets of every
                # later wave at their sampled positions, spilled to disk so no later wave reruns the original.
                wanted = [name for t in wave + later for name in t.sampled] + [t.x_name for t in wave]
                batches = capture(model, list(dict.fromkeys(wanted)), calibration)
            else:
                batches = capture(current, [t.x_name for t in wave], calibration)
            done = 0
            for index, (values, count) in enumerate(batches):
                for t in wave:
                    start = time.perf_counter()
                    if w == waves[0]:
                        positions, y = _sample_targets(t, values, rng, count, len(calibration))
                    else:
                        positions, y = _load_targets(spill, t, index)
                    patches = t.patches(values[t.x_name], positions)
                    accumulators[t.y_name].add(patches, y)
                    if t.y_name in samples:
                        samples[t.y_name].add(patches, y)
                    t.seconds += time.perf_counter() - start
                for t in later:
                    start = time.perf_counter()
                    positions, y = _sample_targets(t, values, rng, count, len(calibration))
                    _save_targets(spill, t, index, positions, y)
                    t.seconds += time.perf_counter() - start
                done += count
                if progress:
                    progress(f"fitting wave {w + 1}/{len(waves)}", done, len(calibration))
            # Before the fits, which are the wave's peak: the captured batch, the partly rewritten model (rebuilt
            # after them) and what the capture freed are not needed (VGG16: 0.19 GB).
            values = batches = current = None
            release_free_memory()
            for t in wave:
                start = time.perf_counter()
                fitted[t.y_name] = _fit(t, accumulators.pop(t.y_name).finish(), options, w, method, samples.pop(t.y_name, None))
                t.seconds += time.perf_counter() - start
                fitted[t.y_name].seconds = t.seconds
                log.info(
                    "%s: output NMSE %.4g fitted vs %.4g data-free (%.2fs)",
                    t.plan.node, fitted[t.y_name].output_error, fitted[t.y_name].output_error_data_free, t.seconds,
                )  # fmt: skip
            release_free_memory()
            if w != waves[-1]:
                current = _with_fitted_weights(model, targets, fitted)
    return fitted


def _sample_targets(t: _Target, values: dict, rng, feeds: int, total_feeds: int):
    """Positions to sample for one batch of ``feeds`` (of ``total_feeds``), and the original targets there ``(N, P)``.

    A fit through a following depthwise conv samples only the positions where that conv reads no padding.
    """
    y = values[t.target_name]
    if t.through is None:
        candidates = np.arange(y.shape[0] * int(np.prod(y.shape[2:])))
    else:
        candidates = interior_positions(t.through.geometry, values[t.y_name].shape[2:], y.shape[2:], y.shape[0])
    limit = max(1, round(positions_per_feed(t.features, t.spec.group, total_feeds) * feeds))
    positions = candidates[sample_positions(len(candidates), rng, limit)]
    return positions, flatten_output(y)[:, positions]


def _spill_path(spill: str, t: _Target, index: int) -> str:
    return os.path.join(spill, f"{hashlib.sha1(t.y_name.encode()).hexdigest()}_{index}.npz")


def _save_targets(spill: str, t: _Target, index: int, positions: np.ndarray, y: np.ndarray) -> None:
    np.savez(_spill_path(spill, t, index), positions=positions, y=y)


def _load_targets(spill: str, t: _Target, index: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(_spill_path(spill, t, index)) as data:
        return data["positions"], data["y"]


# Statistics of all convs in one independent pass may not exceed this many bytes; more convs take more passes.
# At 2 GiB all of VGG16's (1.1 GB) were held at once and the pass peaked at 2.7 GB; at 256 MiB each of its five
# 512-channel convs (170 MB each) takes a pass of its own, six in all, and the pass peaks under 1.2 GB.
CURVE_MEMORY_BUDGET = 256 * 2**20


def calibrated_error_curves(
    model: onnx.ModelProto,
    plans: Sequence[LayerPlan],
    calibration: CalibrationSet,
    options: DistillOptions = DistillOptions(),
    progress: Progress | None = None,
    fits: MutableMapping | None = None,
) -> None:
    """Replace each eligible main-graph conv's ``error_at_rank`` by errors measured on calibration data.

    ``fits``, when given, collects every fit: ``fits[output][rank] = (factors, bias)`` (a dict, or a
    ``FitStore`` that keeps them in files, in float32: they only feed the float32 output probe).

    Every conv is fitted on the original model's inputs (independent), at
    every rank that saves MACs, with one alternating round: an estimate of
    the conv's own contribution to the error, the same for every allocation.
    Ranks that save nothing get ``inf``. Convs are captured together in as
    few passes as ``CURVE_MEMORY_BUDGET`` allows.
    """
    graph = gs.import_onnx(model)
    targets = _targets(graph, plans, eligible=True, through=options.refit and options.through_depthwise)
    rng = np.random.default_rng(options.seed)
    chunks, chunk, used = [], [], 0
    for t in targets:
        size = 8 * t.spec.group * (t.features + 1) ** 2
        if chunk and used + size > CURVE_MEMORY_BUDGET:
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append(t)
        used += size
    if chunk:
        chunks.append(chunk)
    for index, group in enumerate(chunks):
        accumulators = {t.y_name: t.accumulator() for t in group}
        done = 0
        names = [name for t in group for name in t.sampled] + [t.x_name for t in group]
        for values, count in capture(model, list(dict.fromkeys(names)), calibration):
            for t in group:
                _accumulate(t, values, accumulators[t.y_name], rng, count, len(calibration))
            done += count
            if progress:
                progress(f"measuring error curves {index + 1}/{len(chunks)}", done, len(calibration))
        for t in group:
            stats = accumulators.pop(t.y_name).finish()
            full = len(t.plan.error_at_rank or [])
            errors = [float("inf")] * full
            for r in range(1, full + 1):
                cost = separable_cost(t.spec.in_channels, t.spec.out_channels, t.spec.kernel_size, t.spec.group, r, None, False)
                if cost.macs_per_pixel >= t.plan.macs_per_pixel_before:
                    break
                if t.through is not None:
                    fit = fit_through(
                        t.spec.weight, t.spec.bias, stats, r, t.through.operator, t.through.gain, t.through.offset,
                        ridge=options.ridge,
                    )  # fmt: skip
                else:
                    fit = lowrank.fit_separable(
                        t.spec.weight, t.spec.group, t.spec.bias, stats, r, rounds=1, ridge=options.ridge, whiten=options.whiten
                    )
                errors[r - 1] = fit.squared_error / stats.centred_energy
                release_free_memory()  # the fit's freed temporaries: 0.27 GB of heap by VGG16's fourth conv otherwise
                if fits is not None:
                    fits.setdefault(t.y_name, {})[r] = (fit.factors, fit.bias)
            t.plan.error_at_rank = errors
            t.plan.error_source = "calibration"
            if t.plan.projection_macs_per_pixel is not None and t.through is None:
                t.plan.projected_error_at_rank = _projected_errors(t, stats)
            stats = None  # a 512-channel 3×3 conv's is 170 MB: not held into the next chunk
        values = None  # the last batch's captured activations
        release_free_memory()


def _projected_errors(t: _Target, stats: lowrank.RegressionStats) -> list[float]:
    """The input-projected rewrite's NMSE at every rank that saves MACs (``inf`` beyond)."""
    errors = [float("inf")] * (t.plan.full_rank or 0)
    for r in range(1, len(errors) + 1):
        if t.plan.macs_per_pixel_at(r, FORM_PROJECTED) >= t.plan.macs_per_pixel_before:
            break
        errors[r - 1] = fit_projected(t.spec.weight, t.spec.bias, stats, r).squared_error / stats.centred_energy
    return errors


def _targets(graph: gs.Graph, plans: Sequence[LayerPlan], eligible: bool = False, through: bool = False) -> list[_Target]:
    """Main-graph convs planned for rewriting (or all eligible ones), with what fitting needs.

    ``through``: a conv whose output reaches a depthwise conv linearly is fitted at that conv's output.
    """
    wanted = {p.output: p for p in plans if (p.eligible if eligible else p.rewritten) and p.graph == "main"}
    for p in plans:
        if p.rewritten and p.graph != "main" and not eligible:
            p.notes.append("inside a subgraph: factorised data-free (activations there cannot be captured)")
    graph_outputs = {t.name for t in graph.outputs}
    targets = []
    for output, node in convs_by_output(graph).items():
        if output in wanted:
            spec = ConvSpec.from_node(node, graph, {})
            target = _Target(wanted[output], spec, node.inputs[0].name, output)
            found = match_activation(node, spec.out_channels, graph_outputs)
            if not eligible and wanted[output].form == FORM_PROJECTED:
                target.activation_reason = PROJECTED_FIT_NOTE  # tied weights: neither refinement keeps the tie
                targets.append(target)
                continue
            if isinstance(found, Activation):
                target.activation = found
            else:
                target.activation_reason = found
            if through and not isinstance(found, Activation):
                # Error curves fit every rank up to the kernel size; a planned fit only its own.
                _fit_through_if_linear(target, node, graph_outputs, spec.kernel_size if eligible else wanted[output].rank)
            targets.append(target)
    return targets


def _fit_through_if_linear(target: _Target, node: gs.Node, graph_outputs: set[str], rank: int) -> None:
    """Point ``target`` at the depthwise conv its output feeds with nothing nonlinear between, if any, and the
    composed problem at ``rank`` is small enough (``composed_fit.MAX_WORK``)."""
    following = match_following_depthwise(node, target.spec, graph_outputs)
    if isinstance(following, str):
        return
    spec = target.spec
    cost = work(spec.in_channels, spec.out_channels, spec.kernel_size, following.composed_taps, rank)
    if cost > MAX_WORK:
        return
    target.through = following
    target.activation_reason = None


def _row_samples(wave: list[_Target], options: DistillOptions, rng: np.random.Generator) -> dict[str, RowSample]:
    """A row sample for each conv of the wave that gets the activation-aware refinement; the others say why not."""
    if not (options.activation_aware and options.refit):
        return {}
    aware = []
    for t in wave:
        if t.activation is None:
            continue
        if t.plan.full_rank is not None and t.plan.rank >= t.plan.full_rank:
            t.activation_reason = "full rank: the linear fit is already exact"
            continue
        aware.append(t)
    samples = {}
    for t in aware:
        rows = RowSample.rows_within(
            t.spec.in_channels, t.spec.out_channels, t.spec.kernel_size,
            ACTIVATION_SAMPLE_BYTES // len(aware), ACTIVATION_SAMPLE_ROWS,
        )  # fmt: skip
        if rows < ACTIVATION_MIN_ROWS:
            t.activation_reason = f"only {rows} sample rows fit the activation sample's memory cap"
            continue
        samples[t.y_name] = RowSample(rows, rng)
    return samples


def _assign_waves(graph: gs.Graph, targets: list[_Target]) -> None:
    """Wave of a conv = the most planned convs on any path from the graph inputs to it."""
    by_output = {t.y_name: t for t in targets}
    depth: dict[str, int] = defaultdict(int)
    for node in graph.nodes:  # ONNX stores nodes in topological order
        d = max((depth[t.name] for t in node.inputs), default=0)
        target = by_output.get(node.outputs[0].name) if node.outputs else None
        if target is not None:
            target.wave = d
            d += 1
        for out in node.outputs:
            depth[out.name] = d


def _accumulate(
    t: _Target,
    values: dict[str, np.ndarray],
    accumulator: RegressionAccumulator,
    rng: np.random.Generator,
    feeds: int,
    total_feeds: int,
) -> None:
    """Add one batch of the original model's inputs and outputs of ``t``, at sampled positions."""
    positions, y = _sample_targets(t, values, rng, feeds, total_feeds)
    accumulator.add(t.patches(values[t.x_name], positions), y)


def _fit(
    t: _Target,
    stats: lowrank.RegressionStats,
    options: DistillOptions,
    wave: int,
    method: str,
    sample: RowSample | None = None,
) -> FittedLayer:
    if t.through is not None:
        return _fit_at_following_depthwise(t, stats, options, wave)
    if t.plan.form == FORM_PROJECTED:
        return _fit_projected(t, stats, options, wave)
    result = lowrank.fit_separable(
        t.spec.weight,
        t.spec.group,
        t.spec.bias,
        stats,
        t.plan.rank,
        rounds=options.rounds,
        ridge=options.ridge,
        whiten=options.whiten,
        refit=options.refit,
    )
    factors, bias, squared_error = result.factors, result.bias, result.squared_error
    objective, activated, activated_linear, note = "linear", None, None, t.activation_reason
    if sample is not None and sample.x is not None:
        release_free_memory()  # the linear fit's freed temporaries (0.25 GB for a 512-channel conv) before more
        refined = fit_activated(
            t.spec.weight, factors, bias, stats, sample.x, sample.y, t.activation,
            iterations=options.activation_iterations, ridge=options.ridge,
        )  # fmt: skip
        activated, activated_linear = refined.error, refined.error_linear
        if refined.improved:
            factors, bias, objective = refined.factors, refined.bias, "activated"
            squared_error = lowrank.regression_error(lowrank.dense_weights(factors, bias), stats)
        else:
            note = "the activation-aware refinement did not lower the activated error; the linear fit is kept"
    return FittedLayer(
        factors=factors,
        bias=bias,
        weight_error=_weight_error(factors, t.spec.weight),
        output_error=squared_error / stats.centred_energy,
        output_error_data_free=result.data_free_error / stats.centred_energy,
        seconds=0.0,
        wave=wave,
        method=method,
        activation=t.activation.label if t.activation is not None else None,
        objective=objective,
        activated_error=activated,
        activated_error_linear=activated_linear,
        note=note if options.activation_aware and options.refit else None,
    )


def _weight_error(factors: lowrank.SeparableFactors, weight: np.ndarray) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F of the kernel the factors compute."""
    weight = np.asarray(weight, dtype=np.float64)
    return float(np.linalg.norm(lowrank.reconstruct(factors) - weight) / max(np.linalg.norm(weight), 1e-30))


def _fit_projected(t: _Target, stats: lowrank.RegressionStats, options: DistillOptions, wave: int) -> FittedLayer:
    """The input-projected rewrite (``projection``), fitted to the conv's own (linear) output."""
    fitted = fit_projected(t.spec.weight, t.spec.bias, stats, t.plan.rank)
    weight = t.spec.weight.astype(np.float64)
    factors = fitted.factors.separable()
    free = data_free_projected(weight, t.plan.rank).separable()
    original_bias = np.zeros(weight.shape[0]) if t.spec.bias is None else np.asarray(t.spec.bias, dtype=np.float64)
    free_error = lowrank.regression_error(lowrank.dense_weights(free, original_bias), stats)
    return FittedLayer(
        factors=factors,
        bias=fitted.bias,
        weight_error=_weight_error(factors, weight),
        output_error=fitted.squared_error / stats.centred_energy,
        output_error_data_free=free_error / stats.centred_energy,
        seconds=0.0,
        wave=wave,
        method="input projection + whitened SVD + least squares" + (" (sequential)" if options.sequential else " (independent)"),
        activation=t.activation.label if t.activation is not None else None,
        note=PROJECTED_FIT_NOTE,
        projected=fitted.factors,
    )


def _fit_at_following_depthwise(t: _Target, stats: lowrank.RegressionStats, options: DistillOptions, wave: int) -> FittedLayer:
    """The composed fit (``composed_fit``): errors are the following depthwise conv's output errors."""
    through = t.through
    result = fit_through(
        t.spec.weight, t.spec.bias, stats, t.plan.rank, through.operator, through.gain, through.offset, ridge=options.ridge
    )
    return FittedLayer(
        factors=result.factors,
        bias=result.bias,
        weight_error=_weight_error(result.factors, t.spec.weight),
        output_error=result.squared_error / stats.centred_energy,
        output_error_data_free=result.data_free_error / stats.centred_energy,
        seconds=0.0,
        wave=wave,
        method="SVD + ALS at the following depthwise conv's output" + (" (sequential)" if options.sequential else " (independent)"),
        objective="after-depthwise",
        note=f"{THROUGH_FIT_NOTE} ({through.node}), where the errors are measured",
    )


def _with_fitted_weights(model: onnx.ModelProto, targets: list[_Target], fitted: dict[str, FittedLayer]) -> onnx.ModelProto:
    """The original model with each fitted conv's kernel and bias replaced by their dense equivalents.

    A dense conv with the reconstructed kernel computes the same function as the
    separable rewrite, so later waves see the inputs the rewritten model will
    produce, without any graph surgery here.
    """
    kernels = {
        t.y_name: (lowrank.reconstruct(fitted[t.y_name].factors), fitted[t.y_name].bias) for t in targets if t.y_name in fitted
    }
    return with_dense_kernels(model, kernels, label="fitted")
