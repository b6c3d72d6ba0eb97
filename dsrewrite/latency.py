"""onnxruntime timing: whole models before/after, and per-conv microbenchmarks of every emission form.

MACs are not time: a depthwise conv is memory-bound, the Concat copies, and a
depthwise conv with depth multiplier > 1 misses onnxruntime's fast kernel. So
where dsrewrite chooses ranks itself, it also times each planned conv alone, at
its real input shape, in every equivalent emission form, next to the original
conv, and keeps the fastest form, or the original when no form is faster.

Measurement: ``ORT_ENABLE_ALL`` sessions (as deployed), warm-up runs, then the
candidates are run *interleaved* (A B C A B C ...) so that machine noise hits
them alike; we keep medians. Per-conv results are cached on disk, keyed by the
conv's attributes and shapes, the candidate, the onnxruntime version, the
thread count and the CPU model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .cache import cache_path, read_json, write_json
from .heap import release_free_memory
from .verify import random_feeds, session

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def make_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """A session as deployed (``ORT_ENABLE_ALL``); models over 2 GB load as in verification."""
    return session(model, threads=threads, optimize=True)


def interleaved_medians(
    sessions: Sequence[ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    *,
    warmup: int = 3,
    min_repeats: int = 5,
    max_repeats: int = 200,
    budget_seconds: float = 0.3,
) -> list[list[float]]:
    """Run each session in turn, round after round; return every session's run times in ms.

    The number of rounds adapts so the whole measurement takes about ``budget_seconds``. Each round runs the
    sessions in a fresh (seeded) order: a run is slowed by what the run before it left in the caches, and in a
    fixed order one session always follows the same other one (two copies of one INT8 model, each timed after a
    different model, measured 3-5% apart in a fixed order, within 1.5% shuffled).
    """
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, dict(feed))
    # One timed round to size the rest.
    times: list[list[float]] = [[] for _ in sessions]
    order = np.random.default_rng(0)
    start_round = time.perf_counter()
    _round(sessions, feed, times, order)
    per_round = max(time.perf_counter() - start_round, 1e-6)
    repeats = int(min(max_repeats, max(min_repeats, budget_seconds / per_round)))
    for _ in range(repeats - 1):
        _round(sessions, feed, times, order)
    return times


def _round(sessions, feed, times, order: np.random.Generator) -> None:
    for i in order.permutation(len(sessions)):
        start = time.perf_counter()
        sessions[i].run(None, dict(feed))
        times[i].append((time.perf_counter() - start) * 1e3)


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Timing":
        ordered = sorted(samples)
        n = len(ordered)
        return cls(
            median_ms=float(statistics.median(ordered)),
            p10_ms=float(ordered[int(0.1 * (n - 1))]),
            p90_ms=float(ordered[int(0.9 * (n - 1))]),
            runs=n,
        )


# Seconds one whole-model benchmark spends timing (both models, interleaved).
BENCHMARK_SECONDS = 3.0
# A rewritten model whose measured speedup is below this is reported as slower: interleaved medians of the
# same model agree within about 2% on this kind of machine, so anything lower is not noise.
SLOWER_BELOW = 0.98


def benchmark_models(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
    budget_seconds: float | None = None,
    references: Mapping[str, onnx.ModelProto] | None = None,
) -> dict:
    """Median latency of both models, measured interleaved in one process.

    ``references`` (label -> model, e.g. ``{"int8_without_rewrite": …}``) are timed in the same rounds and
    reported as ``latency_<label>_ms`` and ``speedup_vs_<label>`` (the rewritten model against them).
    """
    references = dict(references or {})
    models = [original, rewritten, *references.values()]
    sessions = [make_session(model, threads) for model in models]
    budget = BENCHMARK_SECONDS if budget_seconds is None else budget_seconds
    times = interleaved_medians(sessions, feed, warmup=5, min_repeats=20, max_repeats=2000, budget_seconds=budget)
    del sessions
    release_free_memory()
    before, after = Timing.of(times[0]), Timing.of(times[1])
    extra = {}
    for label, samples in zip(references, times[2:]):
        reference = Timing.of(samples).median_ms
        extra[f"latency_{label}_ms"] = reference
        extra[f"speedup_vs_{label}"] = reference / after.median_ms if after.median_ms > 0 else None
    return {
        "threads": threads,
        "runs": before.runs,
        "latency_before_ms": before.median_ms,
        "latency_after_ms": after.median_ms,
        "speedup": before.median_ms / after.median_ms if after.median_ms > 0 else None,
        "spread_before_ms": [before.p10_ms, before.p90_ms],
        "spread_after_ms": [after.p10_ms, after.p90_ms],
        "graph_optimization": "ORT_ENABLE_ALL",
        **extra,
    }


def node_times(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], *, threads: int = 1, runs: int = 20, warmup: int = 2
) -> dict[str, tuple[str, float]]:
    """Kernel time per run of every node onnxruntime executes: ``{node name: (op type, ms)}``.

    From onnxruntime's profiler, on the optimised graph (``ORT_ENABLE_ALL``): fused and
    layout-transformed nodes appear under the names onnxruntime gives them. The profiler records every run, so
    the first ``warmup`` runs (allocation, first touches) are dropped, and each node gets its median over the
    ``runs`` after them: one run preempted by another process must not move a node's share.
    """
    import tempfile  # noqa: PLC0415

    total_runs = runs + warmup
    with tempfile.TemporaryDirectory(prefix="dsrewrite-profile-") as tmp:
        # The same session path as every other run, so models over 2 GB are profiled too.
        release_free_memory()  # what building the candidate freed (in-place ladders: 0.19 GB over nine of them)
        sess = session(model, threads=threads, optimize=True, profile_prefix=os.path.join(tmp, "profile"))
        for _ in range(total_runs):
            sess.run(None, dict(feed))
        path = sess.end_profiling()
        del sess
        release_free_memory()  # a VGG16 session left 0.1-0.2 GB of freed heap behind, more with each profile
        try:
            events = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return {}
    samples: dict[str, tuple[str, list[float]]] = {}
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        op, durations = samples.setdefault(node, (str(event.get("args", {}).get("op_name", "")), []))
        durations.append(float(event.get("dur", 0)) / 1e3)
    return {node: (op, _per_run(durations, total_runs, warmup)) for node, (op, durations) in samples.items()}


def _per_run(durations: list[float], total_runs: int, warmup: int) -> float:
    """A node's time per run: the median over the timed runs of its per-run sums (a node inside a loop runs
    several times a run); the mean over all runs when its count does not split evenly into runs."""
    per_run, remainder = divmod(len(durations), total_runs)
    if per_run == 0 or remainder:
        return sum(durations) / total_runs
    sums = np.asarray(durations).reshape(total_runs, per_run).sum(axis=1)
    return float(np.median(sums[warmup:]))


def amdahl(share: float | None, ratio: float | None) -> float | None:
    """The whole-model speedup when a ``share`` of the run time is scaled by ``ratio`` (``ratio=0``: that part takes
    no time at all); None when either is unknown or the model would take no time."""
    if share is None or ratio is None:
        return None
    remaining = (1.0 - share) + share * ratio
    return 1.0 / remaining if remaining > 0 else None


def conv_time_share(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], *, threads: int = 1, runs: int = 20) -> float | None:
    """Fraction of the model's run time spent in Conv nodes, from onnxruntime's profiler.

    Fused nodes (e.g. Conv + activation) count as conv time, as they run the conv kernel.
    """
    times = node_times(model, feed, threads=threads, runs=runs)
    total = sum(ms for _op, ms in times.values())
    conv = sum(ms for op, ms in times.values() if "Conv" in op)
    return conv / total if total > 0 else None


# -- per-conv candidates ----------------------------------------------------------------------


class LatencyCache:
    """Per-conv measurements on disk, keyed by everything that changes the numbers."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = read_json(path)

    def get(self, key: str) -> float | None:
        return self.data.get(key)

    def put(self, key: str, value: float) -> None:
        self.data[key] = value

    def save(self) -> None:
        write_json(self.path, self.data)


def default_cache_path() -> Path:
    return cache_path("latency.json")


def machine_key(threads: int) -> str:
    return json.dumps({"ort": ort.__version__, "threads": threads, "cpu": _cpu_model(), "machine": platform.machine()})


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def candidate_key(layer_key: dict, candidate: str, threads: int) -> str:
    text = json.dumps({"layer": layer_key, "candidate": candidate, "machine": machine_key(threads)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# Seconds of timing per conv, over all its candidates (at least 5 interleaved rounds each whatever the budget).
LAYER_BUDGET_SECONDS = 0.3


def cached_times(names: Sequence[str], layer_key: dict, cache: LatencyCache, *, threads: int) -> dict[str, float] | None:
    """The cached median of every candidate in ``names``, or None when any is missing."""
    times = {name: cache.get(candidate_key(layer_key, name, threads)) for name in names}
    return None if any(value is None for value in times.values()) else times


def measure_layer(
    models: Mapping[str, onnx.ModelProto],
    input_shape: Sequence[int],
    layer_key: dict,
    cache: LatencyCache,
    *,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """Median ms of each single-conv model in ``models`` (keys: "original" or "rank:form"), cached."""
    result, missing = {}, []
    for name in models:
        value = cache.get(candidate_key(layer_key, name, threads))
        if value is None:
            missing.append(name)
        else:
            result[name] = value
    if missing:
        # Measure every candidate of the layer, even the cached ones, each interleaved with the original so they
        # share its noise: one candidate at a time, so only two sessions and their intermediate tensors are alive
        # at once whatever the number of ranks (a rank-10 concat of a 64-channel conv at 224x224 holds 128 MB).
        # The time budget is split over the pairs; the original's median is over all its rounds.
        feed = random_feeds(models["original"], {"x": list(input_shape)}, seed)  # in the model's float type
        candidates = [name for name in models if name != "original"]
        budget = LAYER_BUDGET_SECONDS * 2 / (len(candidates) + 1)
        original: list[float] = []
        reference = make_session(models["original"], threads)
        for index, name in enumerate(candidates):
            session_ = make_session(models[name], threads)
            times = interleaved_medians([reference, session_], feed, budget_seconds=budget, warmup=3 if index == 0 else 2)
            del session_
            original += times[0]
            result[name] = float(statistics.median(times[1]))
        if not candidates:  # the conv alone, with nothing to compare
            original = interleaved_medians([reference], feed)[0]
        result["original"] = float(statistics.median(original))
        del reference
        release_free_memory()
        for name in models:
            cache.put(candidate_key(layer_key, name, threads), result[name])
    return result
