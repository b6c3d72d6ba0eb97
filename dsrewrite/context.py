"""RewriteContext: the state one ``rewrite`` carries from stage to stage.

It holds the options, the original and the working model, the analysed
shapes, the calibration data, the latency cache, progress, the pass results
and the notes for the report. Stages read it and add to it; none reaches back
into the caller.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import onnx

from .calibration import CalibrationSet, capture
from .errors import InputError, UsageError
from .graph import CONV_OPS, collect_shapes, declared_dims
from .model_io import check_model, load_model
from .options import RewriteOptions
from .pipeline import PassResult, infer_shapes
from .verify import feed_shapes, random_feeds

log = logging.getLogger(__name__)


@dataclass
class RewriteContext:
    options: RewriteOptions
    source: str  # the input's path, or "<ModelProto>"
    original: onnx.ModelProto  # never modified
    model: onnx.ModelProto  # the working model: the original after the preparing passes
    shapes: dict  # tensor name -> shape at the analysed input shapes
    calibration: CalibrationSet | None = None
    notes: list[str] = field(default_factory=list)
    preparation_results: list[PassResult] = field(default_factory=list)  # of the passes before emission
    conv_pixels: dict[str, int] | None = None  # output positions per conv, averaged over calibration shapes
    warnings: list[str] = field(default_factory=list)  # the notes the CLI also prints as warning lines (see warn)
    emitted: dict[str, list[str]] = field(default_factory=dict)  # conv output -> the node names it was emitted as
    finetune: dict | None = None  # what fine-tuning did, for the report
    output_guard: dict | None = None  # what the output guard measured and left alone, for the report
    guard_deferred: bool = False  # the output guard waits for fine-tuning's trained factors
    emission_results: list[PassResult] = field(default_factory=list)  # of the last emission and the passes after it
    _latency_cache: object = None
    _deployed_model: onnx.ModelProto | None = None
    _timing_ranges: object = None  # quantize.TimingRanges, once the working model is deployed in INT8

    @property
    def results(self) -> list[PassResult]:
        """Every pass that ran on the delivered model, in order (an emission done again replaces the first)."""
        return self.preparation_results + self.emission_results

    @classmethod
    def open(cls, model: onnx.ModelProto | str | os.PathLike, options: RewriteOptions) -> "RewriteContext":
        """Load and check the model, analyse its shapes and open the calibration data."""
        repairs: list[str] = []  # what was repaired of a checker-only defect: a note and a warning line
        if isinstance(model, (str, os.PathLike)):
            source, original = str(model), load_model(model, repairs=repairs)
        elif isinstance(model, onnx.ModelProto):
            source, original = "<ModelProto>", check_model(model, repairs=repairs)
        else:
            raise UsageError(f"model must be a path or an onnx.ModelProto, not {type(model).__name__}")
        notes = list(repairs)
        calibration = None
        overrides = dict(options.input_shapes)
        if options.calibration.data is not None:
            calibration = CalibrationSet(options.calibration.data, original, limit=options.calibration.samples)
            for name, (given, wanted) in calibration.casts.items():
                notes.append(f"calibration input '{name}' was {given}: cast to the model's {wanted}")
        refuse_bfloat16_convs(original)
        working = without_io_value_info(inline_conv_functions(original, notes))
        conv_pixels = None
        variants = shapes_from_calibration(working, calibration, overrides) if calibration is not None else []
        if variants:
            overrides = variants[0][0]  # the most common shapes: for inference and timing
            described = ", ".join("x".join(map(str, dims)) for name, dims in overrides.items() if name not in options.input_shapes)
            if len(variants) == 1:
                notes.append(f"dynamic dims costed at the calibration feeds' shape ({described}); --input-shape overrides")
            else:
                notes.append(
                    f"dynamic dims: MACs are the average over the calibration feeds' {len(variants)} shapes (the most "
                    f"common: {described}, {variants[0][1]} of {sum(c for _, c in variants)} feeds); --input-shape overrides"
                )
        shapes = analysis_shapes(working, overrides, notes)
        if len(variants) > 1:
            others = [(analysis_shapes(working, more, []), count) for more, count in variants[1:]]
            conv_pixels = averaged_conv_pixels(working, [(shapes, variants[0][1]), *others])
        return cls(options, source, original, working, shapes, calibration, notes, conv_pixels=conv_pixels, warnings=list(repairs))

    def warn(self, messages) -> None:
        """Notes that also deserve a warning line: the report has them, and the CLI prints them on stderr."""
        self.notes.extend(messages)
        self.warnings.extend(messages)

    @property
    def progress(self) -> Callable[[str, int, int], None] | None:
        return self.options.progress

    def latency_cache(self):
        """The on-disk cache of per-conv timings, opened once per rewrite."""
        if self._latency_cache is None:
            from .latency import LatencyCache  # noqa: PLC0415

            path = self.options.latency.cache
            self._latency_cache = LatencyCache(Path(path) if path else None)
        return self._latency_cache

    def deployed_model(self) -> onnx.ModelProto:
        """The working model in the precision it will run in (quantized once per rewrite with ``--quantize``):
        what the rewrite is timed against and compared with."""
        if self.options.deploy.quantize is None:
            return self.model
        if self._deployed_model is None:
            from .quantize import TimingRanges  # noqa: PLC0415

            self._deployed_model, self._timing_ranges = TimingRanges.calibrate(self.model, self.calibration)
        return self._deployed_model

    def deploy_candidate(self, model: onnx.ModelProto, owners: dict[str, str]) -> onnx.ModelProto:
        """A timing candidate (the working model with ``owners``' convs rewritten) in the deployed precision, its
        unchanged part quantized with the deployed working model's ranges (``quantize.TimingRanges``)."""
        if self.options.deploy.quantize is None:
            return model
        from .quantize import quantize_int8  # noqa: PLC0415

        self.deployed_model()
        if self._timing_ranges is not None:
            try:
                return self._timing_ranges.quantize(model, owners)
            except Exception as exc:  # noqa: BLE001 - a range the quantizer cannot use: calibrate this one instead
                log.info("timing candidate quantized with its own calibration (%s)", exc)
        return quantize_int8(model, [self.one_feed()])  # speed does not depend on the ranges

    def one_feed(self) -> dict:
        """The first calibration feed, else seeded random inputs at the analysed shapes."""
        if self.calibration is not None:
            return next(iter(self.calibration))
        return random_feeds(self.original, feed_shapes(self.original, self.options.input_shapes), self.options.seed)


def refuse_bfloat16_convs(model: onnx.ModelProto) -> None:
    """InputError for convs with bfloat16 weights: onnxruntime's CPU provider has no bfloat16 Conv, so no rewrite
    of them could be verified (and numpy, which the factorisation runs in, has no bfloat16 either)."""
    bf16 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16}
    bf16 |= {
        n.output[0] for n in model.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].t.data_type == onnx.TensorProto.BFLOAT16
    }  # fmt: skip
    conv = next((n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in bf16), None)
    if conv is not None:
        raise InputError(
            f"conv '{conv.name or conv.output[0]}' has bfloat16 weights; onnxruntime's CPU provider runs no bfloat16 "
            "Conv, so its rewrite could not be verified: convert the model to float16 or float32 first"
        )


def inline_conv_functions(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """``model`` with its local functions inlined when any holds a conv, so those convs are analysed and rewritten.

    The passes see graphs, not function bodies; inlining (``onnx.inliner``) puts the bodies in the graph. The
    output model then has no local functions, and the report says so. Models without a conv in a function are
    returned as they are.
    """
    holding = [f for f in model.functions if any(node.op_type in CONV_OPS for node in f.node)]
    if not holding:
        return model
    import onnx.inliner  # noqa: PLC0415

    inlined = onnx.inliner.inline_local_functions(model)
    names = ", ".join(sorted({f"{f.domain}.{f.name}" if f.domain else f.name for f in holding}))
    notes.append(
        f"inlined the model's local functions ({len(model.functions)}, convs in {names}) so their convs are "
        "rewritten; the output model has no local functions"
    )
    return inlined


def without_io_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without ``value_info`` entries that repeat a graph input or output (a copy, only if it has any).

    ``value_info`` is for the other values; an exporter that lists an output there too, without its shape (ddddocr's
    quantized CRNN), makes onnx-graphsurgeon, which the passes edit graphs with, give the output the entry's empty
    shape, and the exported graph then fails the ONNX checker.
    """
    graph = model.graph
    io = {value.name for value in [*graph.input, *graph.output]}
    repeated = [value for value in graph.value_info if value.name in io]
    if not repeated:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [value for value in copy.graph.value_info if value.name not in io]
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(kept)
    return copy


def inputs_left_dynamic(model: onnx.ModelProto, overrides: Mapping) -> dict[str, list[int | None]]:
    """Graph inputs (not initializers, not in ``overrides``) with a dynamic dim past the batch dim, and their
    declared dims (None where dynamic). A dynamic batch alone does not count: it is costed per sample."""
    initializers = {i.name for i in model.graph.initializer}
    dynamic = {}
    for vi in model.graph.input:
        known = list(declared_dims(vi) or ())
        if vi.name in initializers or vi.name in overrides or not known:
            continue
        if None in known[1:]:
            dynamic[vi.name] = known
    return dynamic


def shapes_from_calibration(
    model: onnx.ModelProto, calibration: CalibrationSet, overrides: Mapping
) -> list[tuple[dict, int]]:
    """The input shapes the calibration feeds give, for inputs whose non-batch dims are dynamic: one
    ``(overrides plus those shapes, number of feeds)`` per distinct combination, most common first.

    Empty when no such input is left dynamic (``--input-shape`` wins). The batch dim stays per sample (1)
    where the model leaves it dynamic.
    """
    dynamic = {name: known[0] or 1 for name, known in inputs_left_dynamic(model, overrides).items()}
    if not dynamic:
        return []
    counts = Counter(
        tuple((name, (batch,) + tuple(int(d) for d in feed[name].shape[1:])) for name, batch in dynamic.items())
        for feed in calibration
    )
    return [({**overrides, **dict(combination)}, count) for combination, count in counts.most_common()]


def averaged_conv_pixels(model: onnx.ModelProto, variants: list[tuple[dict, int]]) -> dict[str, int]:
    """Output positions per conv (by output tensor), averaged over analysed shapes weighted by their feed counts;
    a conv whose positions are unknown at any of them is left out."""
    import onnx_graphsurgeon as gs  # noqa: PLC0415

    from .graph import ConvSpec, convs_by_output  # noqa: PLC0415

    graph = gs.import_onnx(model)
    convs = convs_by_output(graph)
    pixels = {output: [ConvSpec.from_node(node, graph, shapes).output_pixels() for shapes, _ in variants] for output, node in convs.items()}
    counts = [count for _, count in variants]
    return {
        output: round(sum(p * c for p, c in zip(values, counts)) / sum(counts))
        for output, values in pixels.items()
        if None not in values
    }


def analysis_shapes(model: onnx.ModelProto, overrides: Mapping[str, tuple[int, ...]], notes: list[str]) -> dict:
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
        dims = list(declared_dims(vi) or ())
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
