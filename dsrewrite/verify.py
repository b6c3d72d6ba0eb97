"""Run the original and the rewritten model in onnxruntime and compare their outputs.

Both models see the same feeds: seeded random inputs, or calibration samples
when given. Per output we report max/mean absolute error, max relative error,
cosine similarity, and the smallest atol (at the given rtol) and rtol (at the
given atol) that would have passed. With a tolerance the comparison is
``|a − b| ≤ atol + rtol·|a|`` elementwise (``a`` original, ``b`` rewritten),
as in ``numpy.allclose``; without one only names, shapes, dtypes and
finiteness are checked.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .cores import available_cores
from .errors import InputError, UsageError
from .heap import release_free_memory, releases_free_memory
from .model_io import onnxruntime_source

log = logging.getLogger(__name__)

# Tolerances applied at --rank full when none are given: float32 rewrites
# change the summation order, nothing else.
# Full-rank defaults by the outputs' float type: the rewrite is exact in real arithmetic, so what is left is
# rounding, which grows with the type's epsilon (float16 2^-10, bfloat16 2^-7, against float32's 2^-23).
FULL_RANK_TOLERANCES = {
    "float64": (1e-4, 1e-3), "float32": (1e-4, 1e-3), "float16": (2e-2, 2e-2), "bfloat16": (1.5e-1, 1.5e-1),
}  # fmt: skip
FULL_RANK_ATOL, FULL_RANK_RTOL = FULL_RANK_TOLERANCES["float32"]
_PRECISION = {
    onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
}  # fmt: skip


def output_precision(model: onnx.ModelProto) -> str:
    """The least precise float type among the model's outputs ("float32" when none is float)."""
    found = [_PRECISION[o.type.tensor_type.elem_type] for o in model.graph.output if o.type.tensor_type.elem_type in _PRECISION]
    order = list(FULL_RANK_TOLERANCES)
    return max(found, key=order.index, default="float32")
# Unknown non-batch dims get this size for the random verification feeds.
DEFAULT_DYNAMIC_DIM = 64


@dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    finite: bool
    min_atol: float  # smallest atol that passes at the run's rtol
    min_rtol: float  # smallest rtol that passes at the run's atol
    passed: bool
    # Share of positions whose argmax over the last axis is unchanged (a decision proxy: the class of a
    # classifier, the symbol of a CTC frame); None unless the output is 2-D or 3-D with a last axis of 2 or more
    # that the model does not declare as growing with its input (see ``_decisions_on_last_axis``).
    argmax_agreement: float | None = None


@dataclass
class VerificationResult:
    ran: bool
    passed: bool | None
    atol: float | None = None
    rtol: float | None = None
    inputs: str = ""
    samples: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    outputs: list[OutputComparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def session(
    model: onnx.ModelProto,
    *,
    threads: int = 1,
    optimize: bool = True,
    profile_prefix: str | None = None,
    spin: bool = True,
) -> ort.InferenceSession:
    """A CPU session for any model dsrewrite handles (over 2 GB included); ``profile_prefix`` turns on profiling.

    ``spin=False`` stops idle worker threads from spinning: for runs that are not timed, on a machine that other
    work may share (spinning threads that wait for a busy core slow everyone down)."""
    options = ort.SessionOptions()
    # Worker threads spin for tens of ms after a run by default. Timings interleave sessions, and every other live
    # session's spinning workers then take the cores: three identical 2-thread sessions timed in turn measured
    # 2.3-3.6x slower than one alone. Stopping the spin when a run returns keeps it inside runs, where it pays:
    # on captcha_crnn at 2 threads, no spinning at all cost 16%, stopping it after each run about 1%.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # failures surface as exceptions; ORT's own log lines would add stderr noise
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # Over 2 GB or with tensors left on disk: a path or the bytes plus the data folder (model_io).
    with onnxruntime_source(model) as (source, config):
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def feed_shapes(model: onnx.ModelProto, overrides: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Concrete shapes for every graph input: overrides, else known dims, batch 1, other dims 64."""
    initializers = {i.name for i in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        if vi.name in overrides:
            shapes[vi.name] = [int(d) for d in overrides[vi.name]]
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (1 if i == 0 else DEFAULT_DYNAMIC_DIM)
            for i, d in enumerate(dims)
        ]
    return shapes


def random_feeds(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], seed: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal floats; zeros for integer and bool inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name not in shapes:
            continue
        elem = vi.type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else np.dtype(np.float32)
        shape = list(shapes[vi.name])
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dtype)
    return feeds


@releases_free_memory  # before: what emitting the model freed; after: the sessions' arenas
def verify(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    atol: float | None,
    rtol: float | None,
    inputs_label: str = "random",
) -> VerificationResult:
    """Compare the two models on ``feeds``. Raises InputError if the original itself cannot run."""
    result = VerificationResult(ran=True, passed=None, atol=atol, rtol=rtol, inputs=inputs_label)
    threads = available_cores()  # not a timing: every core shortens the two models' runs
    if iter(feeds) is feeds:  # an iterator: the second model needs the feeds again
        feeds = list(feeds)
    # One session at a time, the original's outputs held in between: two of VGG16's sessions took 0.38 GB.
    try:
        reference = session(original, threads=threads, spin=False)
    except Exception as exc:
        raise InputError(f"the input model does not load in onnxruntime ({_short(exc)}); use --no-verify to skip") from None
    ref_outputs = [o.name for o in reference.get_outputs()]
    expected_per_feed = []
    for feed in feeds:
        feed = dict(feed)
        if not result.input_shapes:
            result.input_shapes = {k: list(v.shape) for k, v in feed.items()}
        try:
            expected_per_feed.append([np.asarray(a) for a in reference.run(None, feed)])
        except Exception as exc:
            raise InputError(f"the input model fails in onnxruntime on the verification inputs ({_short(exc)})") from None
    if not expected_per_feed:
        raise UsageError("verification got no input samples")
    del reference
    release_free_memory()
    try:
        candidate = session(rewritten, threads=threads, spin=False)
    except Exception as exc:
        result.passed = False
        result.problems.append(f"the rewritten model does not load in onnxruntime: {_short(exc)}")
        return result

    cand_outputs = [o.name for o in candidate.get_outputs()]
    if ref_outputs != cand_outputs:
        result.passed = False
        result.problems.append(f"output names differ: {ref_outputs} vs {cand_outputs}")
        return result

    per_output: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in ref_outputs}
    for feed, expected in zip(feeds, expected_per_feed):
        try:
            actual = candidate.run(None, dict(feed))
        except Exception as exc:
            result.passed = False
            result.problems.append(f"the rewritten model fails in onnxruntime: {_short(exc)}")
            return result
        result.samples += 1
        for name, a, b in zip(ref_outputs, expected, actual):
            per_output[name].append((a, np.asarray(b)))

    fixed = _decisions_on_last_axis(original)
    for name, pairs in per_output.items():
        comparison, problems = _compare(name, pairs, atol, rtol, decisions=fixed.get(name, True))
        result.outputs.append(comparison)
        result.problems.extend(problems)
    held = not result.problems and all(o.passed for o in result.outputs)
    # "passed" is a claim about a tolerance: without one the outputs were compared (the figures speak), not passed.
    result.passed = False if not held else (True if atol is not None or rtol is not None else None)
    return result


def _decisions_on_last_axis(model: onnx.ModelProto) -> dict[str, bool]:
    """Per graph output with a declared shape: whether its last axis can hold decisions.

    A choice among alternatives (classes, symbols) is over a set the model fixes. A last axis the model declares
    with a symbolic size grows with the input: anchors of a YOLO head (``[batch, 4 + classes, anchors]``), time
    steps, pixels. The argmax along it picks a position, which near-ties flip without any decision changing (a
    YOLOv8 quantized to INT8: 1% "agreement" at cosine 0.9963). Outputs declared without a symbolic last dim keep
    the 2-D/3-D rule.
    """
    sizes = {}
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim if output.type.HasField("tensor_type") else []
        if dims:
            sizes[output.name] = not dims[-1].HasField("dim_param")  # a dim of unknown size tells nothing
    return sizes


def _compare(
    name: str, pairs: list[tuple[np.ndarray, np.ndarray]], atol: float | None, rtol: float | None,
    decisions: bool = True,
) -> tuple[OutputComparison, list[str]]:
    problems = []
    for a, b in pairs:
        if a.shape != b.shape:
            problems.append(f"output '{name}': shape {list(b.shape)} differs from the original {list(a.shape)}")
        if a.dtype != b.dtype:
            problems.append(f"output '{name}': dtype {b.dtype} differs from the original {a.dtype}")
    if problems:
        nan = float("nan")
        return OutputComparison(name, list(pairs[0][0].shape), nan, nan, nan, nan, False, nan, nan, False), problems

    # Pair by pair, in float64: concatenating every feed's output first held about eight float64 copies of all of
    # them at once (2.9 GB for 64 detector maps of 736×736, where the outputs themselves are 0.28 GB).
    stats = _Stats(atol, rtol)
    for a, b in pairs:
        stats.scale_pass(a)
    for a, b in pairs:
        stats.add(a, b)
    finite = stats.finite
    if not finite:
        problems.append(f"output '{name}' has NaN or Inf where the original is finite")
    max_abs, mean_abs, max_rel, cosine, min_atol, min_rtol = stats.results()
    passed = finite
    if atol is not None or rtol is not None:
        passed = passed and stats.within_tolerance
    agreement = None
    # Decisions live on the last axis of (N, C) class scores and (N, T, C) / (T, N, C) sequence scores; a 4-D
    # map (a detector's heatmap) has none there.
    if decisions and pairs[0][0].ndim in (2, 3) and pairs[0][0].shape[-1] >= 2:
        same = [np.argmax(p[0], axis=-1) == np.argmax(p[1], axis=-1) for p in pairs]
        agreement = float(np.concatenate([s.ravel() for s in same]).mean())
    comparison = OutputComparison(
        argmax_agreement=agreement,
        name=name,
        shape=list(pairs[0][0].shape),
        max_abs=max_abs,
        mean_abs=mean_abs,
        max_rel=max_rel,
        cosine=cosine,
        finite=finite,
        min_atol=min_atol,
        min_rtol=min_rtol,
        passed=passed,
    )
    return comparison, problems


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


class _Stats:
    """The comparison figures of one output, accumulated feed by feed (two passes: the largest reference magnitude,
    which floors the relative error, then everything else)."""

    def __init__(self, atol: float | None, rtol: float | None):
        self.run_atol, self.run_rtol = atol or 0.0, rtol or 0.0
        self.scale_max = 0.0
        self.finite = True
        self.within_tolerance = True
        self.count = 0
        self.max_abs = self.sum_abs = self.max_rel = self.min_atol = self.min_rtol = 0.0
        self.dot = self.norm_a = self.norm_b = 0.0

    def scale_pass(self, a: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.float64).ravel()
        a = a[np.isfinite(a)]
        if a.size:
            self.scale_max = max(self.scale_max, float(np.abs(a).max()))

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.float64).ravel()
        b = np.asarray(b, dtype=np.float64).ravel()
        ref_finite = np.isfinite(a)
        self.finite = self.finite and bool(np.all(np.isfinite(b[ref_finite])))
        a, b = a[ref_finite], b[ref_finite]
        if not a.size:
            return
        diff = np.abs(a - b)
        scale = np.abs(a)
        # Relative to each element, floored at 1e-6 of the output's largest magnitude
        # so exact zeros in the reference do not make the ratio meaningless.
        floor = max(self.scale_max * 1e-6, np.finfo(np.float64).tiny)
        self.count += a.size
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.max_rel = max(self.max_rel, float((diff / np.maximum(scale, floor)).max()))
        self.dot += float(a @ b)
        self.norm_a += float(a @ a)
        self.norm_b += float(b @ b)
        self.min_atol = max(self.min_atol, float(np.max(diff - self.run_rtol * scale, initial=0.0)))
        excess = diff - self.run_atol
        with np.errstate(divide="ignore", invalid="ignore"):
            needed = np.where(excess > 0, excess / scale, 0.0)
        self.min_rtol = max(self.min_rtol, float(np.max(needed, initial=0.0)))
        self.within_tolerance = self.within_tolerance and bool(np.all(diff <= self.run_atol + self.run_rtol * scale))

    def results(self) -> tuple[float, float, float, float, float, float]:
        """max_abs, mean_abs, max_rel, cosine, min_atol, min_rtol."""
        norms = float(np.sqrt(self.norm_a) * np.sqrt(self.norm_b))
        cosine = self.dot / norms if norms > 0 else (1.0 if self.max_abs == 0 else 0.0)
        mean_abs = self.sum_abs / self.count if self.count else 0.0
        return self.max_abs, mean_abs, self.max_rel, cosine, self.min_atol, self.min_rtol
