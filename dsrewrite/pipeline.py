"""Pass infrastructure: passes, the conditions they require and ensure, and the Pipeline that runs them.

A pass edits an onnx-graphsurgeon graph in place and returns a
:class:`PassResult`: the changes it made and the things it deliberately left
alone, each with a reason. Passes never print; they log through ``logging``.

A pass may declare :class:`Condition`\\ s: ``requires`` must hold for the model
it is given, ``ensures`` holds for the model it leaves (the ONNX checker is an
``ensures`` of ``decompose_conv``). A :class:`Pipeline` is itself a pass: run on
a model, it imports it once, checks what its passes require, runs them, exports
once (keeping the model-level fields of the input) and checks what they ensure;
nested in another pipeline, it runs its passes on the shared graph and hands its
conditions up. A broken ``requires`` is bad input; a broken ``ensures`` is a bug.

Timing and logging are instruments around every pass (:class:`PassTimer`,
:class:`PassLogger`), not part of the runner.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import onnx
import onnx_graphsurgeon as gs

from .errors import DsrewriteError, InputError, PassError
from .graph import Shape, collect_shapes, export_model
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
    """What one pass did. ``facts`` carries pass-specific records (e.g. the layer plan);
    ``inner`` the results of the passes a pipeline ran."""

    pass_name: str
    changes: list[Change] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    facts: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    inner: list["PassResult"] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def leaves(self) -> Iterator["PassResult"]:
        """This result, or for a pipeline the results of the passes it ran, depth first."""
        if not self.inner:
            yield self
        for result in self.inner:
            yield from result.leaves()


@dataclass
class PassContext:
    """What a pass may read besides the graph: tensor shapes of the analysed model, and when costs are averaged
    over several input shapes, the output positions per conv (keyed by conv output) to cost with."""

    shapes: dict[str, Shape]
    opset: int
    conv_pixels: dict[str, int] | None = None


# -- conditions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A property of a model: ``check(model)`` returns None when it holds, else why not."""

    name: str
    check: Callable[[onnx.ModelProto], str | None]


def _checker_problem(model: onnx.ModelProto) -> str | None:
    try:
        run_checker(model)  # also for models over 2 GB or with tensors left on disk
    except Exception as exc:  # noqa: BLE001 - ValidationError and friends
        return " ".join(str(exc).split())[:500] or type(exc).__name__
    return None


def _sort_problem(model: onnx.ModelProto) -> str | None:
    graph = model.graph
    known = {vi.name for vi in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        missing = [name for name in node.input if name not in known]
        if missing:
            return f"node {node.name or node.op_type!r} reads {missing[0]!r} before it is computed"
        known.update(node.output)
    return None


ONNX_CHECKER = Condition("passes the ONNX checker", _checker_problem)
TOPOLOGICALLY_SORTED = Condition("main graph topologically sorted", _sort_problem)


# -- passes -------------------------------------------------------------------------------------


@runtime_checkable
class Pass(Protocol):
    """Anything with a ``name`` and ``run(graph, context) -> PassResult``.

    ``requires`` and ``ensures`` (tuples of :class:`Condition`) are optional.
    """

    name: str

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult: ...


class PassBase:
    """Convenience base class: no conditions unless a subclass declares them."""

    name = "unnamed_pass"
    requires: tuple[Condition, ...] = ()
    ensures: tuple[Condition, ...] = ()

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


def requires_of(p: Pass) -> tuple[Condition, ...]:
    return tuple(getattr(p, "requires", ()) or ())


def ensures_of(p: Pass) -> tuple[Condition, ...]:
    return tuple(getattr(p, "ensures", ()) or ())


# -- instruments --------------------------------------------------------------------------------


class Instrument(Protocol):
    """Called around every pass a pipeline runs (nested pipelines included)."""

    def before_pass(self, p: Pass) -> None: ...

    def after_pass(self, p: Pass, result: PassResult) -> None: ...


class PassTimer:
    """Sets ``PassResult.seconds`` to the wall time of the pass."""

    def __init__(self) -> None:
        self._starts: list[float] = []

    def before_pass(self, p: Pass) -> None:
        self._starts.append(time.perf_counter())

    def after_pass(self, p: Pass, result: PassResult) -> None:
        result.seconds = time.perf_counter() - self._starts.pop()


class PassLogger:
    def before_pass(self, p: Pass) -> None:
        log.debug("%s: start", p.name)

    def after_pass(self, p: Pass, result: PassResult) -> None:
        log.info("%s: %d changes, %d skips (%.2fs)", p.name, len(result.changes), len(result.skips), result.seconds)


def default_instruments() -> list[Instrument]:
    return [PassTimer(), PassLogger()]


# -- the pipeline -------------------------------------------------------------------------------


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    results: list[PassResult]  # one per pass that ran, nested pipelines flattened


class Pipeline(PassBase):
    """Runs passes in order on one imported graph; itself a pass.

    >>> from dsrewrite.passes import FoldBatchNorm, DecomposeConv, Cleanup
    >>> Pipeline([FoldBatchNorm(), DecomposeConv(), Cleanup()]).run(model).model  # doctest: +SKIP
    """

    def __init__(self, passes: Sequence[Pass], *, name: str = "pipeline", instruments: Sequence[Instrument] | None = None):
        self.passes = list(passes)
        self.name = name
        self.instruments = list(default_instruments() if instruments is None else instruments)

    @property
    def requires(self) -> tuple[Condition, ...]:
        """What some pass requires and no pass before it ensures."""
        needed, ensured = [], set()
        for p in self.passes:
            needed += [c for c in requires_of(p) if c not in ensured and c not in needed]
            ensured.update(ensures_of(p))
        return tuple(needed)

    @property
    def ensures(self) -> tuple[Condition, ...]:
        return tuple(dict.fromkeys(c for p in self.passes for c in ensures_of(p)))

    def run(self, target, context: PassContext | None = None, *, shapes: dict[str, Shape] | None = None):
        """On an ``onnx.ModelProto``: a :class:`PipelineResult`. On a graph (nested): a :class:`PassResult`."""
        if isinstance(target, onnx.ModelProto):
            return self._run_model(target, shapes)
        result = PassResult(self.name)
        result.inner = self._run_passes(target, context, source=None)
        for inner in result.inner:
            result.changes += inner.changes
            result.skips += inner.skips
        return result

    def inspect(
        self, model: onnx.ModelProto, *, shapes: dict[str, Shape] | None = None, conv_pixels: dict[str, int] | None = None
    ) -> list[PassResult]:
        """Run read-only passes (analyses) on ``model``: their results, with no export and no model."""
        context = _context(model, shapes, conv_pixels)
        results = self._run_passes(gs.import_onnx(model), context, source=model)
        return [leaf for r in results for leaf in r.leaves()]

    def _run_model(self, model: onnx.ModelProto, shapes: dict[str, Shape] | None) -> PipelineResult:
        for condition in self.requires:
            problem = condition.check(model)
            if problem:
                owner = next(p.name for p in self.passes if condition in requires_of(p))
                raise InputError(f"the model does not meet what pass '{owner}' requires ({condition.name}): {problem}")
        context = _context(model, shapes)
        graph = gs.import_onnx(model)
        results = self._run_passes(graph, context, source=model)
        rewritten = export_model(graph, model)
        for condition in self.ensures:
            problem = condition.check(rewritten)
            if problem:
                owners = [p.name for p in self.passes if condition in ensures_of(p)]
                raise DsrewriteError(
                    f"internal error: the model after pass '{owners[-1]}' breaks what it ensures ({condition.name}): {problem}"
                )
        return PipelineResult(model=rewritten, results=[leaf for r in results for leaf in r.leaves()])

    def _run_passes(self, graph: gs.Graph, context: PassContext, *, source: onnx.ModelProto | None) -> list[PassResult]:
        results: list[PassResult] = []
        for p in self.passes:
            for instrument in self.instruments:
                instrument.before_pass(p)
            try:
                result = p.run(graph, context)
            except DsrewriteError:
                raise
            except Exception as exc:
                problem = _inconsistency(source) if source is not None else None
                if problem:  # a model ONNX itself rejects is bad input, not a pass bug
                    raise InputError(f"the model is inconsistent ({problem}); pass '{p.name}' cannot process it") from exc
                raise PassError(p.name, [r.pass_name for r in results], exc) from exc
            for instrument in self.instruments:
                instrument.after_pass(p, result)
            results.append(result)
        return results


def _context(model: onnx.ModelProto, shapes: dict[str, Shape] | None, conv_pixels: dict[str, int] | None = None) -> PassContext:
    """What the passes get to read; the model must hold only values onnx-graphsurgeon can import and export."""
    if shapes is None:
        shapes = collect_shapes(infer_shapes(model))
    check_value_types(model)  # what onnx-graphsurgeon cannot export is an input error, not a crash
    return PassContext(shapes=shapes, opset=default_opset(model), conv_pixels=conv_pixels)


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
