"""Pass infrastructure: the Pass protocol, PassResult, and the Pipeline that runs passes.

A pass edits an onnx-graphsurgeon graph in place and returns a
:class:`PassResult`: the changes it made and the things it deliberately left
alone, each with a reason. Passes never print; they log through ``logging``.
The pipeline imports the model once, runs the passes in order, exports once,
and keeps the model-level fields (IR version, opsets, producer, metadata)
of the input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import onnx
import onnx_graphsurgeon as gs

from .errors import DsrewriteError, InputError, PassError
from .graph import Shape, collect_shapes
from .model_io import check_value_types, run_checker, without_large_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    node: str
    description: str


@dataclass(frozen=True)
class Skip:
    node: str
    reason: str


@dataclass
class PassResult:
    """What one pass did. ``facts`` carries pass-specific records (e.g. the layer plan)."""

    pass_name: str
    changes: list[Change] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    facts: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.changes)


@dataclass
class PassContext:
    """What a pass may read besides the graph: tensor shapes of the analysed model."""

    shapes: dict[str, Shape]
    opset: int


@runtime_checkable
class Pass(Protocol):
    name: str

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult: ...


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    results: list[PassResult]


class Pipeline:
    """Runs passes in order on one imported graph.

    >>> from dsrewrite.passes import FoldBatchNorm, DecomposeConv, Cleanup
    >>> Pipeline([FoldBatchNorm(), DecomposeConv(), Cleanup()]).run(model).model  # doctest: +SKIP
    """

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def run(self, model: onnx.ModelProto, *, shapes: dict[str, Shape] | None = None) -> PipelineResult:
        if shapes is None:
            shapes = collect_shapes(infer_shapes(model))
        check_value_types(model)  # what onnx-graphsurgeon cannot export is an input error, not a crash
        graph = gs.import_onnx(model)
        context = PassContext(shapes=shapes, opset=default_opset(model))
        results: list[PassResult] = []
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p.run(graph, context)
            except DsrewriteError:
                raise
            except Exception as exc:
                problem = _inconsistency(model)  # a model ONNX itself rejects is bad input, not a pass bug
                if problem:
                    raise InputError(f"the model is inconsistent ({problem}); pass '{p.name}' cannot process it") from exc
                raise PassError(p.name, [r.pass_name for r in results], exc) from exc
            result.seconds = time.perf_counter() - start
            log.info("%s: %d changes, %d skips (%.2fs)", p.name, len(result.changes), len(result.skips), result.seconds)
            results.append(result)
        return PipelineResult(model=export_model(graph, model), results=results)


def _inconsistency(model: onnx.ModelProto) -> str | None:
    """Why the ONNX checker with strict shape inference rejects ``model``, or None."""
    try:
        run_checker(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError, InferenceError
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return (lines[-1] if lines else type(exc).__name__)[:300]
    return None


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 1


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that never fails the rewrite: unknown stays unknown."""
    try:
        # Large initializers as typed inputs: the same shapes, without serialising their data (or failing past 2 GB).
        return onnx.shape_inference.infer_shapes(without_large_tensors(model), strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort; costs fall back to "unknown"
        log.warning("shape inference failed: %s", exc)
        return model


def export_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` and restore the model-level fields of ``original``."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = original.ir_version
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    model.producer_name = original.producer_name
    model.producer_version = original.producer_version
    model.domain = original.domain
    model.model_version = original.model_version
    model.doc_string = original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    if not model.functions and original.functions:
        model.functions.extend(original.functions)
    if model.ir_version < 4:
        _list_initializers_as_inputs(model.graph)
    return model


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR < 4 requires every initializer to be a graph input too."""
    listed = {vi.name for vi in graph.input}
    for init in graph.initializer:
        if init.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
