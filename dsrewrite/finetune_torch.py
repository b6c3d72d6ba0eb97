"""The fine-tuning trainer: PyTorch through onnx2torch (the optional ``finetune`` extra). The only module that
imports torch; ``dsrewrite.finetune`` decides what is trained and against what.

The rewritten model (its convertible copy, cut at the distillation targets) becomes a ``torch.fx`` module; the
Conv modules onnx2torch makes carry the ONNX names of their weight and bias (``onnx_mapping``), which is how a
trainable initializer finds its parameter. Every other parameter and buffer is frozen. The original model's
tensors come from onnxruntime on each step's batch. Adam, shuffled mini-batches of calibration feeds (mostly
mixed, image inputs often moved), a held-out slice that picks the best weights; with a step cap and a seed the run
is deterministic (deterministic algorithms, a fixed thread count).
"""

from __future__ import annotations

import importlib
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from .finetune import LOSS_KL, LOSS_MSE, TEMPERATURE, Target


def import_stack():
    """torch and onnx2torch. onnx2torch imports torchvision for its NMS and RoiAlign converters only; where
    torchvision is missing or built for another torch (PyPI's beside the CPU torch wheel), those two converters
    are left unusable instead of the whole converter."""
    import torch  # noqa: PLC0415

    try:
        import torchvision  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 (any failure to import it: a missing module or a mismatched build)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = _torchvision_stand_in()
    onnx2torch = importlib.import_module("onnx2torch")
    return torch, onnx2torch


def _torchvision_stand_in():
    def unavailable(*_args, **_kwargs):
        raise NotImplementedError("torchvision is not usable beside this torch: NMS and RoiAlign cannot be converted")

    package, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = unavailable
    package.ops = ops
    return package, ops


def stack_label() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    torch, _ = import_stack()
    try:
        converter = version("onnx2torch")
    except PackageNotFoundError:
        converter = "?"
    return f"torch {torch.__version__} + onnx2torch {converter}"


def supported_ops(model: onnx.ModelProto) -> set[str]:
    """The op types of ``model`` onnx2torch has a converter for at the model's opset."""
    _torch, _ = import_stack()
    from onnx2torch.node_converters.registry import get_converter  # noqa: PLC0415

    opsets = {o.domain or "": o.version for o in model.opset_import}
    supported = set()
    for op in {(n.domain or "", n.op_type) for n in model.graph.node}:
        domain, op_type = op
        try:
            get_converter(operation_type=op_type, version=opsets.get(domain, opsets.get("", 13)), domain=domain)
        except NotImplementedError:
            continue
        supported.add(op_type)
    return supported


@dataclass
class TrainSettings:
    seconds: float | None
    steps: int | None
    learning_rate: float
    batch_size: int
    seed: int
    threads: int
    temperature: float = TEMPERATURE
    # Function matching on mixed inputs: most training batches are a per-sample convex mix of two calibration
    # batches, with the original model's outputs on that mix as the target. With a few hundred feeds the student
    # otherwise learns the feeds, not the function (held-out loss stalls while the training loss halves).
    mix: float = 0.75  # the share of steps on mixed inputs (0: the calibration feeds only)
    # Translated inputs: on this share of steps, image-like inputs (4-D floating point, one spatial size) are also
    # moved by up to an eighth of their height and width, per sample, edges repeated. Mixing alone still leaves
    # the held-out loss bottoming out well before the budget ends on a few hundred feeds; moved inputs are new
    # feeds the original model labels (held-out loss 4-8% lower on captcha_crnn at 4x, see bench/README).
    shift: float = 2 / 3
    # Layer hints: each rewritten conv's output is also matched (variance-normalised MSE), weighted against the
    # outputs' loss. Far more numbers per feed than the outputs alone, so a few hundred feeds go further.
    hint_weight: float = 1.0


@dataclass
class TrainResult:
    weights: dict[str, np.ndarray]  # the best weights (by held-out loss), by initializer name
    steps: int
    seconds: float
    loss_before: float  # on every calibration feed
    loss_after: float
    held_out_before: float | None
    held_out_after: float | None
    best_step: int
    trained: list[str] = field(default_factory=list)  # initializer names that were trained
    untrained: list[str] = field(default_factory=list)  # trainable names the converted module did not expose


class ConversionError(Exception):
    """The stack could not convert (or run) the model it was given."""


def train(
    student_model: onnx.ModelProto,
    teacher_model: onnx.ModelProto,
    trainable: Sequence[str],
    targets: Sequence[Target],
    feeds: Sequence[Mapping[str, np.ndarray]],
    held_out: int,
    settings: TrainSettings,
    progress: Callable[[str, int, int, str], None] | None = None,
    hints: Sequence[str] = (),
) -> TrainResult:
    """Train ``trainable`` of ``student_model`` to match ``teacher_model`` on ``targets`` (and, weighted by
    ``settings.hint_weight``, on the ``hints`` tensors). ``student_model``'s outputs are the targets' tensors, then
    the hints, in that order."""
    torch, onnx2torch = import_stack()
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train(torch, onnx2torch, student_model, teacher_model, trainable, targets, list(hints), feeds,
                      held_out, settings, progress)  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _train(torch, onnx2torch, student_model, teacher_model, trainable, targets, hints, feeds, held_out, settings, progress):
    tensors = [t.tensor for t in targets]
    inputs = [i.name for i in student_model.graph.input if i.name not in {t.name for t in student_model.graph.initializer}]
    try:
        module = onnx2torch.convert(student_model, attach_onnx_mapping=True)
    except Exception as exc:  # noqa: BLE001 (any converter failure is reported, not raised)
        raise ConversionError(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc
    module.eval()
    parameters = _trainable_parameters(torch, module, student_model, trainable)

    # The original model's tensors are computed per step (mixed inputs need that anyway, and the layer hints of a
    # few hundred feeds would not fit in memory); only the held-out feeds' outputs are kept, for model selection.
    teacher = _session_with_outputs(teacher_model, tensors + hints)
    train_batches, held_batches = _batches(feeds, inputs, held_out, settings.batch_size)

    def teach(x):
        return [np.asarray(a, dtype=np.float32) for a in teacher.run(tensors + hints, dict(zip(inputs, x)))]

    try:
        teach(train_batches[0])
    except Exception:  # noqa: BLE001 (onnxruntime rejects a batch of several feeds: the model fixes its batch dim)
        train_batches, held_batches = _batches(feeds, inputs, held_out, 1)
    run = _runner(torch, module)
    _check_conversion(torch, student_model, tensors + hints, run, train_batches[0], inputs)

    def distance(target_loss, out, ref, var):
        ref = torch.from_numpy(ref)
        if target_loss == LOSS_KL:
            temperature = settings.temperature
            log_p = torch.log_softmax(ref / temperature, dim=-1)
            log_q = torch.log_softmax(out / temperature, dim=-1)
            return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        return ((out - ref) ** 2).mean() / max(var, 1e-12)

    def output_loss(outputs, y):
        pairs = zip(targets, outputs[: len(tensors)], y, variances)
        return sum(distance(t.loss, out, ref, var) for t, out, ref, var in pairs) / len(targets)

    def training_loss(x, y):
        outputs = run(x)
        loss = output_loss(outputs, y)
        if hints and settings.hint_weight > 0:
            pairs = zip(outputs[len(tensors) :], y[len(tensors) :], variances[len(tensors) :])
            loss = loss + settings.hint_weight * sum(distance(LOSS_MSE, o, r, v) for o, r, v in pairs) / len(hints)
        return loss

    def mean_loss(batches) -> float:
        """The output loss (what selection and the report use) over ``(inputs, output targets)`` batches."""
        with torch.no_grad():
            weights = [len(x[0]) for x, _ in batches]
            return float(sum(output_loss(run(x), y).item() * w for (x, y), w in zip(batches, weights)) / max(sum(weights), 1))

    def unscaled(x, y) -> list[float]:
        """Each target's distance on one batch before the variance normalisation (MSE over variance 1)."""
        with torch.no_grad():
            return [distance(t.loss, out, ref, 1.0).item() for t, out, ref in zip(targets, run(x), y)]

    def scaled(rows) -> float:
        """``mean_loss`` from per-batch ``(samples, unscaled distances)`` once the variances are known."""
        total = sum(w * sum(d if t.loss == LOSS_KL else d / max(v, 1e-12) for t, d, v in zip(targets, ds, variances))
                    for w, ds in rows)  # fmt: skip
        return float(total / len(targets) / max(sum(w for w, _ in rows), 1))

    # One pass of both models over every feed gives what the start needs: each target's variance (the outputs'
    # over every feed, streamed; the hints' over the first batches, which are large), the held-out outputs kept
    # for selection, and the loss before training.
    moments = np.zeros((len(tensors), 3))
    rows, held, probe = [], [], []
    try:
        for index, x in enumerate(train_batches + held_batches):
            y = teach(x)
            outputs = y[: len(tensors)]
            for i, a in enumerate(outputs):
                moments[i] += (a.size, float(a.sum(dtype=np.float64)), float(np.square(a, dtype=np.float64).sum()))
            rows.append((len(x[0]), unscaled(x, outputs)))
            if index < min(4, len(train_batches)):
                probe.append(y[len(tensors) :])
            if index >= len(train_batches):
                held.append((x, outputs))
    except Exception as exc:  # noqa: BLE001 (the converted module does not run: e.g. a shape it fixed)
        raise ConversionError(f"the converted model does not run: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc
    variances = [total_sq / n - (total / n) ** 2 for n, total, total_sq in moments]
    variances += [float(np.var(np.concatenate([y[i].ravel() for y in probe]))) for i in range(len(hints))]
    loss_before = scaled(rows)
    held_before = scaled(rows[len(train_batches) :]) if held else None
    best = {name: p.detach().clone() for name, p in parameters.items()}
    best_loss, best_step = (held_before if held_before is not None else loss_before), 0

    # Adam's steps are about lr in absolute size, whatever a tensor's scale; the factors' scales differ by orders
    # of magnitude (a depthwise kernel carries the singular value, its pointwise the unit vectors), so each
    # tensor's step is relative to its RMS.
    groups = [{"params": [p], "lr": settings.learning_rate * max(float(p.detach().pow(2).mean().sqrt()), 1e-8)}
              for p in parameters.values()]  # fmt: skip
    base_rates = [g["lr"] for g in groups]
    optimizer = torch.optim.Adam(groups)
    rng = np.random.default_rng(settings.seed)
    order: list[int] = []
    evaluate_every = max(1, len(train_batches))  # once per pass over the training feeds
    start = time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        if settings.steps is not None and step >= settings.steps:
            break
        if settings.seconds is not None and elapsed >= settings.seconds:
            break
        if not order:
            order = list(rng.permutation(len(train_batches)))
        scale = schedule(_progress(step, elapsed, settings))
        for group, rate in zip(optimizer.param_groups, base_rates):
            group["lr"] = rate * scale
        optimizer.zero_grad(set_to_none=True)
        x = train_batches[order.pop()]
        if settings.mix > 0 and rng.random() < settings.mix:
            x = _mixed(x, train_batches, rng)
        if settings.shift > 0 and rng.random() < settings.shift:
            x = _shifted(x, rng)
        loss = training_loss(x, teach(x))
        loss.backward()
        optimizer.step()
        step += 1
        last = (settings.steps is not None and step == settings.steps) or (
            settings.seconds is not None and time.perf_counter() - start >= settings.seconds
        )
        if held and (step % evaluate_every == 0 or last):
            current = mean_loss(held)
            if current < best_loss:
                best_loss, best_step = current, step
                best = {name: p.detach().clone() for name, p in parameters.items()}
        if progress:
            done, total = (step, settings.steps) if settings.steps is not None else (int(elapsed), int(settings.seconds))
            progress("fine-tuning", done, total, f"loss {loss.item():.4g}")
    seconds = time.perf_counter() - start
    if held:  # the best weights by the held-out feeds; without any, the last ones
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(best[name])
    else:
        best_step = step
    loss_after = mean_loss([(x, teach(x)[: len(tensors)]) for x in train_batches] + held)
    return TrainResult(
        weights={name: p.detach().numpy().copy() for name, p in parameters.items()},
        steps=step,
        seconds=seconds,
        loss_before=loss_before,
        loss_after=loss_after,
        held_out_before=held_before,
        held_out_after=best_loss if held else None,
        best_step=best_step,
        trained=sorted(parameters),
        untrained=[name for name in trainable if name not in parameters],
    )


def _trainable_parameters(torch, module, model: onnx.ModelProto, trainable: Sequence[str]) -> dict:
    """The Conv parameters whose ONNX initializer is trainable; every parameter is frozen first.

    onnx2torch names each submodule after its ONNX node (its own ``OnnxGraph`` naming, asked here rather than
    copied) and keeps a Conv's weight and bias as that module's parameters, so the node's weight (input 1) and
    bias (input 2) initializers name them.
    """
    from onnx2torch.onnx_graph import OnnxGraph  # noqa: PLC0415

    for p in module.parameters():
        p.requires_grad_(False)
    wanted = set(trainable)
    modules = dict(module.named_modules())
    found = {}
    for unique_name, node in OnnxGraph(model.graph).nodes.items():
        sub = modules.get(unique_name)
        if node.operation_type != "Conv" or not isinstance(sub, torch.nn.modules.conv._ConvNd):
            continue
        for name, attribute in zip(node.input_values[1:3], ("weight", "bias")):
            param = getattr(sub, attribute, None)
            if name in wanted and param is not None and tuple(param.shape) == _initializer_shape(model, name):
                param.requires_grad_(True)
                found[name] = param
    return found


def _initializer_shape(model: onnx.ModelProto, name: str) -> tuple[int, ...] | None:
    return next((tuple(t.dims) for t in model.graph.initializer if t.name == name), None)


# The converted module must compute what onnxruntime computes from the same ONNX model, or its gradients train
# towards another function (onnx2torch is not exact on every exporter's graph).
CONVERSION_TOLERANCE = 1e-3


def _runner(torch, module):
    def run(x):
        outputs = module(*[torch.from_numpy(a) for a in x])
        return outputs if isinstance(outputs, (tuple, list)) else (outputs,)

    return run


def _check_conversion(torch, student_model, names, run, x, inputs) -> None:
    """Raise ConversionError when the converted student disagrees with onnxruntime on the same model and batch."""
    expected = _session_with_outputs(student_model, names).run(list(names), dict(zip(inputs, x)))
    with torch.no_grad():
        actual = [a.numpy() for a in run(x)]
    errors = {}
    for name, a, e in zip(names, actual, expected):
        scale = max(float(np.abs(e).max()), 1e-12)
        errors[name] = float(np.abs(a - e).max()) / scale if a.shape == e.shape else float("inf")
    wrong = [name for name in names if not errors[name] <= CONVERSION_TOLERANCE]
    if wrong:
        raise Disagreement(
            f"the converted model computes {wrong[0]} differently from onnxruntime (max relative error "
            f"{errors[wrong[0]]:.2g})",
            agreeing=[name for name in names if name not in wrong],
        )


class Disagreement(ConversionError):
    """The converted module runs but computes some of its outputs differently; ``agreeing`` are the ones it gets
    right (fine-tuning can still distil to those)."""

    def __init__(self, message: str, agreeing: list[str]):
        super().__init__(message)
        self.agreeing = agreeing


WARMUP = 0.05  # the share of the budget over which the step size ramps up


SHIFT_REACH = 1 / 8  # how far ``_shifted`` moves an input, as a share of its height and width


def schedule(progress: float) -> float:
    """The step-size factor at ``progress`` (0 → 1) of the budget: a linear warm-up, then a cosine decay to zero.

    The factors start from a close fit; Adam's first steps are about full size in every coordinate at once, so
    without a warm-up they knock the fit off before the gradient statistics settle, and the decay lets the last
    steps settle instead of rattling around the minimum.
    """
    if progress < WARMUP:
        return (progress + 1e-3) / WARMUP
    return 0.5 * (1 + np.cos(np.pi * min(1.0, (progress - WARMUP) / (1 - WARMUP))))


def _progress(step: int, elapsed: float, settings) -> float:
    """How far into its budget (steps or seconds, whichever runs out first) training is."""
    shares = []
    if settings.steps is not None:
        shares.append(step / settings.steps)
    if settings.seconds is not None:
        shares.append(elapsed / settings.seconds)
    return max(shares)


def _mixed(x, batches, rng):
    """Inputs ``x`` mixed per sample with another training batch of the same shapes. Inputs that are not
    floating point (indices, masks) cannot be mixed: ``x`` is kept."""
    if not all(np.issubdtype(a.dtype, np.floating) for a in x):
        return x
    partners = [b for b in batches if all(p.shape == a.shape for p, a in zip(b, x))]
    other = partners[int(rng.integers(len(partners)))]
    weight = rng.random(len(x[0]))
    mixed = []
    for a, b in zip(x, other):
        w = weight.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
        mixed.append(w * a + (1 - w) * b)
    return mixed


def _shifted(x, rng, reach: float = SHIFT_REACH):
    """Image-like inputs ``x`` moved per sample by up to ``reach`` of their height and width, edges repeated.

    Only when every input is 4-D floating point with the same height and width (all inputs of a sample move
    together); anything else (token ids, masks, sequences, inputs of different sizes) is returned unchanged.
    """
    if not x or not all(np.issubdtype(a.dtype, np.floating) and a.ndim == 4 for a in x):
        return x
    height, width = x[0].shape[2:]
    if any(a.shape[2:] != (height, width) for a in x):
        return x
    reach_y, reach_x = int(height * reach), int(width * reach)
    moves = [(int(rng.integers(-reach_y, reach_y + 1)), int(rng.integers(-reach_x, reach_x + 1))) for _ in x[0]]
    # Output pixel (y, x) reads input pixel (y - dy, x - dx), clamped to the image: the edges repeat.
    reads = [(np.clip(np.arange(height) - dy, 0, height - 1), np.clip(np.arange(width) - dx, 0, width - 1))
             for dy, dx in moves]  # fmt: skip
    moved = []
    for a in x:
        b = np.empty_like(a)
        for i, (rows, cols) in enumerate(reads):
            b[i] = a[i][:, rows][:, :, cols]
        moved.append(b)
    return moved


def _batches(feeds, inputs, held_out, batch_size):
    """Training and held-out mini-batches of inputs; the last ``held_out`` feeds are held out.

    Feeds of one input shape are concatenated on axis 0, up to ``batch_size``. A model whose batch dim is fixed
    (a feed of several samples would not fit it) is fed one feed at a time.
    """
    cut = len(feeds) - held_out

    def make(indices, size):
        groups: dict[tuple, list[int]] = {}
        for i in indices:
            groups.setdefault(tuple(np.shape(feeds[i][name]) for name in inputs), []).append(i)
        return [
            [np.concatenate([np.asarray(feeds[i][name]) for i in idx[k : k + size]]) for name in inputs]
            for idx in groups.values()
            for k in range(0, len(idx), size)
        ]

    return make(range(cut), batch_size), make(range(cut, len(feeds)), batch_size)


def _session_with_outputs(model: onnx.ModelProto, tensors: Sequence[str]):
    """An onnxruntime session of ``model`` with ``tensors`` as its outputs (the original's targets, or the
    student's for the conversion check)."""
    from .verify import session  # noqa: PLC0415

    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    outputs = {o.name: o for o in model.graph.output}
    del cut.graph.output[:]
    for name in tensors:
        cut.graph.output.append(outputs[name] if name in outputs else onnx.helper.make_empty_tensor_value_info(name))
    return session(cut)
