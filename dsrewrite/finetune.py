"""Distillation fine-tuning, the parts that need no training stack: what to train, against what, and writing back.

After the closed-form fit, the new depthwise and pointwise weights (and the pointwise biases) are trained so that
the rewritten model's outputs match the original model's on the calibration inputs; every other weight is frozen.
This module decides

* which initializers are trainable: the weight and bias inputs of the nodes ``decompose_conv`` emitted
  (``DecomposeConv.emitted``, by node name, not by a naming pattern), when nothing else reads them;
* what the loss is distilled to: the graph outputs, or, where part of the model cannot be differentiated by the
  stack, the deepest tensors before it (the frontier of what it can compute), only those that depend on a
  rewritten conv;
* the loss per target: KL with temperature on the logits where a target is a softmax's output, else MSE
  normalised by the original tensor's variance (so outputs of different scales weigh alike);
* how the model is made convertible (Constant nodes as initializers, ``auto_pad`` SAME_* as explicit pads);
* and writes the trained tensors back into the ONNX model by initializer name.

The trainer itself (``dsrewrite.finetune_torch``) is the only module that imports torch; it is loaded only when
fine-tuning runs, and ``require_stack`` checks for it before any work is done.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import UsageError
from .geometry import ConvGeometry

# The optional extra and the modules it brings; `pip install "dsrewrite[finetune]"`.
EXTRA = "finetune"
STACK_MODULES = ("torch", "onnx2torch")
# Softmax targets are distilled on their logits at this temperature (Hinton et al.'s KD loss, scaled by T²).
TEMPERATURE = 2.0
LOSS_KL, LOSS_MSE = "kl", "mse"
POOL_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})


def require_stack() -> None:
    """Fail with one line naming what to install when the fine-tuning stack is missing."""
    missing = [name for name in STACK_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"--finetune-seconds/--finetune-steps need the optional fine-tuning stack ({', '.join(missing)} not "
            f'installed): pip install "dsrewrite[{EXTRA}]"'
        )


@dataclass(frozen=True)
class Target:
    """One tensor the loss is computed on: the tensor the student outputs and how it is compared."""

    tensor: str  # what both models are cut at (a softmax target: its logits)
    loss: str  # LOSS_KL or LOSS_MSE
    axis: int = -1  # the softmax axis (KL only)
    reported: str = ""  # the tensor the user knows (the softmax output for KL), for the report

    @property
    def name(self) -> str:
        return self.reported or self.tensor


@dataclass
class Distillation:
    """What fine-tuning trains and where its loss is computed, decided before any training."""

    trainable: list[str]  # initializer names
    targets: list[Target]
    subgraph: bool  # True when the targets are not the model's outputs (part of the model is not differentiable)
    covered: list[str]  # rewritten conv outputs whose new weights the loss reaches
    uncovered: list[str] = field(default_factory=list)  # rewritten convs past the differentiable part
    blocked_by: list[str] = field(default_factory=list)  # the op types the stack could not take


# -- what is trained --------------------------------------------------------------------------


def trainable_initializers(model: onnx.ModelProto, emitted: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Per rewritten conv (keyed by its output): the initializers of its emitted Conv nodes (weights, biases).

    An initializer any other node also reads (a bias shared with a conv left alone) stays frozen.
    """
    initializers = {t.name for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    by_name = {node.name: node for node in model.graph.node}
    trainable: dict[str, list[str]] = {}
    for output, names in emitted.items():
        owned = []
        for node_name in names:
            node = by_name.get(node_name)
            if node is None or node.op_type != "Conv":
                continue
            for name in node.input[1:3]:
                if name and name in initializers and readers.get(name) == 1 and name not in owned:
                    owned.append(name)
        if owned:
            trainable[output] = owned
    return trainable


# -- what the loss sees ---------------------------------------------------------------------


def differentiable_tensors(model: onnx.ModelProto, supported: Iterable[str]) -> tuple[set[str], list[str]]:
    """The tensors the stack can compute from the inputs (forward closure through supported ops), and the op
    types that stopped it."""
    supported = set(supported)
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    blocked: list[str] = []
    for node in model.graph.node:  # topologically sorted (ONNX requires it)
        if node.op_type in supported and all(name in known for name in node.input):
            known.update(node.output)
        elif node.op_type not in supported and node.op_type not in blocked:
            blocked.append(node.op_type)
    return known, blocked


def _depends_on(model: onnx.ModelProto, sources: set[str]) -> set[str]:
    """Every tensor computed from one of ``sources``."""
    reached = set(sources)
    for node in model.graph.node:
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def choose_targets(
    model: onnx.ModelProto, trainable: Mapping[str, Sequence[str]], supported: Iterable[str]
) -> Distillation | None:
    """The tensors to distil to: the model's outputs when the stack can compute them all, else the frontier of
    what it can (tensors it computes that an op it cannot take, or the graph output, reads), limited to those
    downstream of a rewritten conv. None when no rewritten conv can be reached.
    """
    computable, blocked = differentiable_tensors(model, supported)
    rewritten_outputs = list(trainable)
    weights = {name for names in trainable.values() for name in names}
    downstream = _depends_on(model, weights) - weights  # computed tensors only: a weight is no target
    graph_outputs = [o.name for o in model.graph.output]
    if all(name in computable for name in graph_outputs):
        tensors, subgraph = [o for o in graph_outputs if o in downstream], False
        blocked = []
    else:
        frontier = []
        for node in model.graph.node:
            if not all(name in computable for name in node.output):
                frontier += [name for name in node.input if name in computable and name in downstream]
        frontier += [name for name in graph_outputs if name in computable and name in downstream]
        tensors, subgraph = _outermost(model, list(dict.fromkeys(frontier))), True
    covered = [o for o in rewritten_outputs if o in computable]
    if not tensors or not covered:
        return None
    return Distillation(
        trainable=[name for output in covered for name in trainable[output]],
        targets=[loss_target(model, name) for name in tensors],
        subgraph=subgraph,
        covered=covered,
        uncovered=[o for o in rewritten_outputs if o not in computable],
        blocked_by=blocked,
    )


def _outermost(model: onnx.ModelProto, tensors: list[str]) -> list[str]:
    """Drop a target that another target is computed from (its error already reaches the deeper one)."""
    kept = []
    for name in tensors:
        later = _depends_on(model, {name}) - {name}
        if not any(other in later for other in tensors if other != name):
            kept.append(name)
    return kept


def loss_target(model: onnx.ModelProto, tensor: str) -> Target:
    """KL at temperature on the logits when ``tensor`` is a Softmax's output over its last axis, else MSE.

    Opset < 13 Softmax flattens the dims from its axis on; only the last axis means the same in every opset.
    """
    producers = {name: n for n in model.graph.node for name in n.output}
    producer = producers.get(tensor)
    while producer is not None and producer.op_type == "Identity":  # exporters end graphs in Identity nodes
        producer = producers.get(producer.input[0])
    if producer is not None and producer.op_type == "Softmax":
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        axis = next((a.i for a in producer.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
        rank = _rank(model, (producer.input[0], producer.output[0], tensor))
        if axis == -1 or (rank is not None and axis == rank - 1):
            return Target(producer.input[0], LOSS_KL, axis=-1, reported=tensor)
    return Target(tensor, LOSS_MSE, reported=tensor)


def _rank(model: onnx.ModelProto, tensors: Sequence[str]) -> int | None:
    """The rank shape inference gives the first of ``tensors`` it knows (all the same rank here), or None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 (inference is only a hint here)
        return None
    ranks = {
        value.name: len(value.type.tensor_type.shape.dim)
        for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        if value.type.tensor_type.HasField("shape")
    }
    return next((ranks[name] for name in tensors if name in ranks), None)


# -- losses (numpy; the trainer has the same formulas in torch) --------------------------------


def normalised_mse(student: np.ndarray, teacher: np.ndarray, variance: float) -> float:
    """Mean squared error over the original tensor's variance: 1.0 is as bad as predicting its mean."""
    return float(np.mean((student - teacher) ** 2) / max(variance, 1e-12))


def softened_kl(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float = TEMPERATURE) -> float:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)) over the last axis, averaged over the other positions."""

    def log_softmax(z):
        z = z / temperature
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(teacher_logits), log_softmax(student_logits)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return float(temperature**2 * kl.mean())


# -- a copy the converter takes ----------------------------------------------------------------


def convertible_copy(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """The same function in a form converters take: Constant tensors as initializers, SAME_* padding as explicit
    pads at the calibration input shapes. Initializer names are kept, so trained weights map back by name."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    if any(_auto_pad(node) in ("SAME_UPPER", "SAME_LOWER") for node in graph.node):
        _explicit_pads(copy, input_shapes)
    return copy


def _auto_pad(node: onnx.NodeProto) -> str:
    attribute = next((a for a in node.attribute if a.name == "auto_pad"), None)
    return attribute.s.decode() if attribute is not None else "NOTSET"


def _explicit_pads(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> None:
    """Resolve SAME_* padding of convs and pools in place, from the spatial dims shape inference gives."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for node in model.graph.node:
        mode = _auto_pad(node)
        if node.op_type not in POOL_OPS or mode not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        spatial = shapes.get(node.input[0], [None, None])[2:]
        kernel = _ints(node, "kernel_shape") or _kernel_from_weight(model, node)
        if not spatial or any(s is None for s in spatial) or not kernel:
            continue  # left as it is: the converter says whether it can take it
        d = len(kernel)
        geometry = ConvGeometry(
            tuple(kernel), tuple(_ints(node, "strides") or [1] * d), (), tuple(_ints(node, "dilations") or [1] * d), mode
        )
        pads = geometry.explicit_pads(spatial)
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("pads", pads)])


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    attribute = next((a for a in node.attribute if a.name == name), None)
    return list(attribute.ints) if attribute is not None else None


def _kernel_from_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> list[int] | None:
    if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
        return None
    weight = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
    return list(weight.dims[2:]) if weight is not None else None


# -- writing back -------------------------------------------------------------------------------


def write_back(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the named initializers replaced (same shape, same dtype as before)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    index = {t.name: i for i, t in enumerate(copy.graph.initializer)}
    missing = [name for name in weights if name not in index]
    if missing:
        raise ValueError(f"no initializer named {', '.join(missing)}")
    for name, value in weights.items():
        old = copy.graph.initializer[index[name]]
        old_array = numpy_helper.to_array(old)
        value = np.asarray(value)
        if value.shape != old_array.shape:
            raise ValueError(f"initializer {name}: trained shape {value.shape} differs from {old_array.shape}")
        copy.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(value.astype(old_array.dtype), name))
    return copy


# -- the stage's work ---------------------------------------------------------------------------


def run_finetune(working, rewritten, emitted, feeds, settings, seed, progress=None):
    """Fine-tune ``rewritten`` against ``working`` (the original after the preparing passes) on ``feeds``.

    Returns ``(model, summary, note)``: the model with the trained weights written back (or ``rewritten`` itself
    when nothing could be trained or training did not lower the calibration loss), the report's ``finetune``
    record and one note line.
    """
    from . import finetune_torch as trainer  # noqa: PLC0415 (torch only when fine-tuning runs)

    summary: dict = {"ran": False, "stack": trainer.stack_label(), "written_back": False}
    trainable = trainable_initializers(rewritten, emitted)
    if not trainable:
        return rewritten, summary, "fine-tuning skipped: no rewritten conv has weights of its own to train"
    shapes = {name: np.shape(value) for name, value in feeds[0].items()}
    student = convertible_copy(rewritten, shapes)
    supported = trainer.supported_ops(student)
    plan = choose_targets(student, trainable, supported)
    if plan is None:
        return rewritten, summary, (
            "fine-tuning skipped: no rewritten conv lies in the part of the model the fine-tuning stack can "
            "differentiate" + _blocked(differentiable_tensors(student, supported)[1])
        )
    targets = [_with_loss(t, settings.loss) for t in plan.targets if _has_tensor(working, t.tensor)]
    if not targets:
        return rewritten, summary, "fine-tuning skipped: the distillation targets are not tensors of the original model"
    inputs = [i.name for i in student.graph.input if i.name not in {t.name for t in student.graph.initializer}]
    # Layer hints: the rewritten convs' outputs the loss reaches, matched alongside the targets (and names both
    # models share: the rewrite keeps each conv's output name).
    hints = [name for name in plan.covered if name not in {t.tensor for t in targets} and _has_tensor(working, name)]
    held_out = len(feeds) // 8 if len(feeds) >= 8 else 0
    train_settings = trainer.TrainSettings(
        seconds=settings.seconds, steps=settings.steps, learning_rate=settings.learning_rate,
        batch_size=settings.batch_size, seed=seed, threads=settings.thread_count(),
    )  # fmt: skip
    summary.update(
        calibration_feeds=len(feeds) - held_out, held_out_feeds=held_out, learning_rate=settings.learning_rate,
        batch_size=settings.batch_size, threads=train_settings.threads, seed=seed,
    )  # fmt: skip
    disagreement = ""
    for attempt in range(2):
        tensors = [t.tensor for t in targets]
        cut = onnx.utils.Extractor(_with_value_info(student, tensors + hints)).extract_model(inputs, tensors + hints)
        in_cut = {t.name for t in cut.graph.initializer}
        names = [name for name in plan.trainable if name in in_cut]
        summary.update(
            targets=[{"tensor": t.name, "loss": t.loss, **({"logits": t.tensor, "temperature": TEMPERATURE} if t.loss == LOSS_KL else {})}
                     for t in targets],  # fmt: skip
            subgraph=plan.subgraph, covered_convs=len(plan.covered), uncovered_convs=plan.uncovered,
            blocked_ops=plan.blocked_by, trainable_initializers=len(names), layer_hints=len(hints),
        )  # fmt: skip
        try:
            result = trainer.train(cut, working, names, targets, feeds, held_out, train_settings,
                                   _progress_with_detail(progress), hints=hints)  # fmt: skip
            break
        except trainer.Disagreement as exc:
            # Distil to the rewritten convs' outputs the conversion gets right; those past them keep their fit.
            agreeing = [name for name in exc.agreeing if name in plan.covered]
            if attempt or not agreeing:
                summary["error"] = str(exc)
                return rewritten, summary, f"fine-tuning skipped: {summary['stack']} {exc}"
            disagreement = str(exc)
            outermost = _outermost(student, agreeing)
            targets, hints = [Target(name, LOSS_MSE, reported=name) for name in outermost], [n for n in agreeing if n not in outermost]
            plan = replace(plan, subgraph=True, covered=agreeing,
                           uncovered=plan.uncovered + [n for n in plan.covered if n not in agreeing])  # fmt: skip
        except trainer.ConversionError as exc:
            summary["error"] = str(exc)
            return rewritten, summary, f"fine-tuning skipped: {summary['stack']} could not convert the rewritten model ({exc})"
    if disagreement:
        summary["disagreement"] = disagreement
    summary.update(
        ran=True, steps=result.steps, seconds=round(result.seconds, 3), best_step=result.best_step,
        loss_before=result.loss_before, loss_after=result.loss_after,
        held_out_loss_before=result.held_out_before, held_out_loss_after=result.held_out_after,
        untrained_initializers=result.untrained,
    )  # fmt: skip
    improved = result.loss_after < result.loss_before and result.best_step > 0
    past = f"{disagreement} past it" if disagreement else "the model past it is not differentiable by the stack" + _blocked(plan.blocked_by)
    where = "" if not plan.subgraph else f"; distilled to {', '.join(t.name for t in targets)} ({past})"
    if plan.uncovered:
        where += f"; {len(plan.uncovered)} rewritten conv(s) past it keep their closed-form fit"
    head = (
        f"fine-tuned {len(plan.covered)} rewritten conv(s) ({summary['stack']}, {result.steps} steps in "
        f"{result.seconds:.1f} s, {train_settings.threads} thread(s)): calibration loss {result.loss_before:.4g} → "
    )
    if not improved:
        return rewritten, summary, head + f"{result.loss_after:.4g}, not lower: the closed-form fit is kept" + where
    summary["written_back"] = True
    model = write_back(rewritten, {name: result.weights[name] for name in result.trained})
    held = (f", held out {result.held_out_before:.4g} → {result.held_out_after:.4g}" if result.held_out_before is not None else "")
    return model, summary, head + f"{result.loss_after:.4g}{held} (best at step {result.best_step})" + where


def _with_loss(target: Target, loss: str) -> Target:
    """``--finetune-loss``: auto keeps the target's own (KL for a softmax output's logits, else MSE); kl treats
    every target as logits over its last axis (a CTC or classifier head without its softmax); mse uses MSE."""
    if loss == "kl":
        return replace(target, loss=LOSS_KL, axis=-1)
    if loss == "mse":
        return replace(target, loss=LOSS_MSE)
    return target


def _with_value_info(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` with a value_info for each of ``names`` (the extractor needs one for every new output): inferred
    where shape inference reaches, else typeless."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 (inference is only a convenience here)
        inferred = onnx.ModelProto()
        inferred.CopyFrom(model)
    known = {v.name for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    for name in names:
        if name not in known:
            inferred.graph.value_info.append(onnx.helper.make_empty_tensor_value_info(name))
    return inferred


def _blocked(ops: Sequence[str]) -> str:
    return f": no converter for {', '.join(ops)}" if ops else ""


def _has_tensor(model: onnx.ModelProto, name: str) -> bool:
    return any(name in node.output for node in model.graph.node) or any(i.name == name for i in model.graph.input)


def _progress_with_detail(progress):
    """The progress callback with a detail text (the loss) when it takes one, else without."""
    if progress is None:
        return None
    import inspect  # noqa: PLC0415

    try:
        parameters = inspect.signature(progress).parameters.values()
        takes_detail = len(parameters) >= 4 or any(p.kind == p.VAR_POSITIONAL for p in parameters)
    except (TypeError, ValueError):
        takes_detail = False
    return progress if takes_detail else (lambda stage, done, total, _detail: progress(stage, done, total))
