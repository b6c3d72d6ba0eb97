"""Does dsrewrite + INT8 beat INT8 alone, and at what accuracy cost?

For each labelled model, in one process:

* ``fp32 original``: the fetched model;
* ``INT8 original``: ``dsrewrite.quantize.quantize_int8(original, calibration)``;
* ``INT8 prepared``: ``dsrewrite.rewrite(path, quantize="int8", plan=<empty plan>)``: the same passes as a
  rewrite (``fold_batchnorm``, ``cleanup``) and the same quantization, but no conv rewritten. The Paddle models
  keep BatchNormalization nodes and Constant-node weights, which quantize_int8 leaves in float (BN) or
  quantizes as activations; the passes fold and clean them up, so part of a rewrite's speedup over
  ``INT8 original`` is the passes', not the rewrite's. ``vs INT8 prepared`` separates the two;
* ``rewrite+INT8 <setting>``: ``dsrewrite.rewrite(path, quantize="int8", calibration=..., <setting>)``;
* ``rewrite fp32 <setting>``: the same without ``quantize`` (for reference);
* ``fp32, INT8's plan <setting>``: the INT8 run's decisions (``plan=result.plan_document()``), fitted alike but
  not quantized: separates what quantizing the rewrite costs from what its different decisions cost;

with the settings ``rank=1``, ``rank=2`` and ``target_macs=0.5``, all fitted sequentially (the default with
calibration) on ``calibration_feeds(name, n=64)`` (``CALIB_SEED``, disjoint from the evaluation set).

Every variant is scored on the same rendered evaluation set (rendered once, reused), with its paired agreement
with the fp32 original (share of samples whose decision is unchanged: the decoded string, the class, or each
pixel of the thresholded det map). Latency: medians of all variants run interleaved in one process
(``dsrewrite.latency``, ``ORT_ENABLE_ALL``, 1 thread) on one calibration feed at the model's INPUT_SHAPE.

The script wraps a few dsrewrite functions (stages, ``quantize_int8``, ``measure_layer``) to time them and
samples the process RSS; the wrappers only observe and call through.

With ``--finetune-seconds S``, each setting also gets ``rewrite+INT8 <setting>, fine-tuned S s``: the INT8 run
fine-tuned before quantization (``finetune_threads``, seed 0), so the output guard judges the trained factors.

Usage:
    python bench/int8.py [--models ppocr_cls captcha_crnn ...] [--n 1000] [--det-pages 300]
                         [--samples 64] [--budget 8] [--out bench/.cache/int8_results.json]
                         [--settings rank=1 rank=2 target_macs=0.5 "rank=1 unguarded"] [--finetune-seconds S]
                         [--finetune-threads 1]

Results: a Markdown table per model on stdout, and ``--out`` (JSON; one key per model, merged with what the
file already holds so models can be run one at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluations  # noqa: E402
from distill import INPUT_SHAPES  # noqa: E402
from evaluations import EVALUATIONS, agreement, calibration_feeds, predict  # noqa: E402
from models import BENCH_DIR, fetch  # noqa: E402

import onnxruntime as ort  # noqa: E402

import dsrewrite  # noqa: E402
import dsrewrite.measure  # noqa: E402
import dsrewrite.quantize  # noqa: E402
import dsrewrite.stages  # noqa: E402
from dsrewrite import latency  # noqa: E402
from dsrewrite.cores import available_cores  # noqa: E402

SETTINGS = {
    "rank=1": {"rank": 1},
    "rank=2": {"rank": 2},
    "target_macs=0.5": {"target_macs": 0.5},
}
# Run only when named in --settings: the output guard off (every rewrite that pays in INT8 is kept).
EXTRA_SETTINGS = {"rank=1 unguarded": {"rank": 1, "max_output_error": float("inf")}}
DEFAULT_N = {"captcha_crnn": 1000, "ppocr_rec": 1000, "ppocr_cls": 1000, "ppocr_det": 300, "yolox_det": 1000}
DATASETS = {
    "captcha_crnn": evaluations.captcha_dataset,
    "ppocr_rec": evaluations.ppocr_rec_dataset,
    "ppocr_cls": evaluations.ppocr_cls_dataset,
    "ppocr_det": evaluations.ppocr_det_dataset,
    "yolox_det": evaluations.yolox_dataset,
}
FP32, INT8, PREPARED = "fp32 original", "INT8 original", "INT8 prepared"
# A plan that rewrites nothing: rewrite() then runs only its other passes (fold_batchnorm, cleanup) and the
# quantization, which is "INT8 alone" as dsrewrite's own pipeline delivers it.
EMPTY_PLAN = {"schema": "dsrewrite.plan/1", "layers": []}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- observation: time spent in dsrewrite's stages and quantizer, and resident memory ------------------------


class Probe:
    """Wall time per wrapped function and peak RSS per labelled phase (sampled every 0.1 s)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak_rss_mib: dict[str, float] = {}
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            rss = self.rss_mib()
            self.peak_rss_mib[self.phase] = max(self.peak_rss_mib.get(self.phase, 0.0), rss)

    @contextlib.contextmanager
    def during(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def wrap(self, module, attribute: str, label: str, phase: bool = False) -> None:
        """Time every call of ``module.attribute``; ``phase``: also attribute its RSS to a sub-phase."""
        original = getattr(module, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                if phase:
                    with self.during(f"{self.phase} > {label}"):
                        return original(*args, **kwargs)
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(module, attribute, timed)

    def take(self) -> dict:
        """Times and calls since the last take (then reset)."""
        out = {k: {"seconds": round(v, 2), "calls": self.calls[k]} for k, v in sorted(self.seconds.items())}
        self.seconds.clear()
        self.calls.clear()
        return out


def install_probe() -> Probe:
    probe = Probe()
    # rewrite() calls the stages through the module, so these wrappers see every call.
    for stage in ("measure_and_decide", "check_in_model", "fit", "emit", "deploy", "verify_outputs"):
        probe.wrap(dsrewrite.stages, stage, f"stage.{stage}", phase=True)
    # Candidates (and the MODEL_TIME model) are quantized through dsrewrite.measure's import of the function;
    # the deploy stage imports it from dsrewrite.quantize at call time.
    probe.wrap(dsrewrite.measure, "quantize_int8", "quantize_int8 (candidate timing)")
    probe.wrap(dsrewrite.quantize, "quantize_int8", "quantize_int8 (deploy)")
    probe.wrap(dsrewrite.latency, "measure_layer", "latency.measure_layer")
    return probe


# -- one model ------------------------------------------------------------------------------------------------


def layer_rows(report) -> list[dict]:
    rows = []
    for p in report.layers:
        if not p.eligible:
            continue
        rows.append({
            "node": p.node, "status": p.status, "rank": p.rank, "form": p.form, "reason": p.reason,
            "kernel": p.kernel, "in": p.in_channels, "out": p.out_channels,
            "latency_before_ms": p.latency_before_ms, "latency_after_ms": p.latency_after_ms,
            "output_error": p.output_error, "fit_seconds": p.fit_seconds,
        })  # fmt: skip
    return rows


def verification_summary(report) -> dict | None:
    v = report.verification
    if v is None or not getattr(v, "ran", False):
        return None
    return {
        "passed": v.passed,
        "outputs": [
            {"name": o.name, "max_abs": o.max_abs, "cosine": getattr(o, "cosine", None),
             "argmax_agreement": o.argmax_agreement}
            for o in v.outputs
        ],
    }  # fmt: skip


def run_model(name: str, n: int, samples: int, budget: float, probe: Probe, latency_cache: Path,
              settings: dict = SETTINGS, finetune: dict | None = None) -> dict:  # fmt: skip
    t_model = time.perf_counter()
    probe.peak_rss_mib.clear()
    probe.take()
    path = fetch(name)
    original = dsrewrite.load_model(path)
    shapes = INPUT_SHAPES[name]
    feeds = calibration_feeds(name, n=samples)
    (input_name, shape), = shapes.items()
    feed = feeds[0]
    assert tuple(feed[input_name].shape) == tuple(shape), (feed[input_name].shape, shape)

    models: dict[str, object] = {FP32: original}
    info: dict[str, dict] = {FP32: {"kind": "original", "precision": "fp32"}}
    errors: dict[str, dict] = {}

    log(f"{name}: quantizing the original")
    with probe.during("INT8 original: quantize_int8"):
        start = time.perf_counter()
        models[INT8] = dsrewrite.quantize.quantize_int8(original, feeds)
        info[INT8] = {"kind": "original", "precision": "int8", "seconds": round(time.perf_counter() - start, 1),
                      "timings": probe.take()}

    def run(label: str, setting: str, keywords: dict, quantize: str | None):
        """One rewrite() call, recorded under ``label``; a failure is recorded (with traceback), not raised."""
        log(f"{name}: {label}")
        start = time.perf_counter()
        try:
            with probe.during(f"{label}: rewrite"):
                result = dsrewrite.rewrite(
                    path, calibration=feeds, input_shapes=shapes, quantize=quantize,
                    latency_cache=latency_cache, **keywords,
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - recorded and reported, not patched
            errors[label] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            log(f"{name}: {label} FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            probe.take()
            return None
        took = time.perf_counter() - start
        report = result.report
        eligible = [p for p in report.layers if p.eligible]
        models[label] = result.model
        info[label] = {
            "kind": "prepared" if label == PREPARED else "rewrite", "precision": "int8" if quantize else "fp32",
            "setting": setting, "seconds": round(took, 1),
            "eligible_macs_ratio": report.totals.eligible_macs_ratio,
            "macs_ratio": report.totals.macs_ratio,
            "convs_rewritten": sum(p.rewritten for p in eligible), "convs_eligible": len(eligible),
            "verification_ok": result.ok, "verification": verification_summary(report),
            "layers": layer_rows(report), "notes": list(report.notes),
            "timings": probe.take(),
        }  # fmt: skip
        log(f"{name}: {label} done in {took:.0f}s: eligible-MAC ratio {report.totals.eligible_macs_ratio}, "
            f"{info[label]['convs_rewritten']}/{len(eligible)} convs rewritten; timings {info[label]['timings']}")
        gc.collect()
        return result

    run(PREPARED, "empty plan (no conv rewritten)", {"plan": EMPTY_PLAN}, "int8")
    for setting, keywords in settings.items():
        quantized = run(f"rewrite+INT8 {setting}", setting, keywords, "int8")
        if finetune:
            # The same, fine-tuned before quantization; the output guard then judges the trained factors.
            run(f"rewrite+INT8 {setting}, fine-tuned {finetune['finetune_seconds']:g} s", setting,
                {**keywords, **finetune}, "int8")  # fmt: skip
        run(f"rewrite fp32 {setting}", setting, keywords, None)
        if quantized is not None:
            # Diagnostic: the INT8 run's decisions (ranks, forms, convs kept), fitted the same way, not quantized.
            # Its gap to the INT8 row is what quantizing the rewrite costs; its gap to "rewrite fp32" is the decisions'.
            run(f"fp32, INT8's plan {setting}", f"plan of rewrite+INT8 {setting}",
                {"plan": quantized.plan_document()}, None)
        del quantized

    # -- accuracy: one rendered set, every variant --------------------------------------------------------------
    dataset = DATASETS[name]
    log(f"{name}: rendering {n} evaluation samples (once)")
    with probe.during("render evaluation set"):
        start = time.perf_counter()
        dataset(n)
        render_s = time.perf_counter() - start
    reference: dict[str, object] = {}
    for label, model in models.items():
        with probe.during(f"{label}: evaluate"):
            start = time.perf_counter()
            pred = predict(name, model, n=n)
            took = time.perf_counter() - start
        row = info[label]
        row["score"] = pred.score
        row["eval_seconds"] = round(took, 1)
        if label in (FP32, INT8):
            reference[label] = pred
        row["agreement_fp32"] = agreement(pred, reference[FP32])
        if INT8 in reference:
            row["agreement_int8_original"] = agreement(pred, reference[INT8])
        if name != "ppocr_det":  # per-sample correctness flips against the fp32 original
            base = reference[FP32].correct
            row["lost_vs_fp32"] = int((base & ~pred.correct).sum())
            row["gained_vs_fp32"] = int((~base & pred.correct).sum())
        log(f"{name}: {label}: score {pred.score:.4f}, agreement {row['agreement_fp32']:.4f} ({took:.0f}s)")
        del pred
        gc.collect()
    cache = dataset.cache_info()
    log(f"{name}: dataset cache {cache} (misses: the evaluation set and the calibration set, each rendered once)")

    # -- latency: every variant interleaved in one process ------------------------------------------------------
    labels = list(models)
    log(f"{name}: timing {len(labels)} variants interleaved (1 thread, budget {budget:g}s)")
    with probe.during("latency"):
        sessions = [latency.make_session(models[label], 1) for label in labels]
        start = time.perf_counter()
        times = latency.interleaved_medians(sessions, feed, warmup=5, min_repeats=20, max_repeats=2000,
                                            budget_seconds=budget)
        timing_s = time.perf_counter() - start
        del sessions
    medians = {label: statistics.median(t) for label, t in zip(labels, times)}
    for label, samples_ms in zip(labels, times):
        t = latency.Timing.of(samples_ms)
        row = info[label]
        row["latency_ms"] = t.median_ms
        row["latency_p10_p90_ms"] = [t.p10_ms, t.p90_ms]
        row["runs"] = t.runs
        row["speedup_vs_fp32"] = medians[FP32] / t.median_ms
        row["speedup_vs_int8_original"] = medians[INT8] / t.median_ms
        if PREPARED in medians:
            row["speedup_vs_int8_prepared"] = medians[PREPARED] / t.median_ms
        row["model_bytes"] = models[label].ByteSize()

    return {
        "model": name,
        "input_shape": {input_name: list(shape)},
        "n_eval": n,
        "calibration_samples": samples,
        "metric": EVALUATIONS[name].metric,
        "variants": info,
        "errors": errors,
        "render_seconds": round(render_s, 1),
        "latency_seconds": round(timing_s, 1),
        "dataset_cache": {"hits": cache.hits, "misses": cache.misses},
        "peak_rss_mib": {k: round(v) for k, v in probe.peak_rss_mib.items()},
        "total_seconds": round(time.perf_counter() - t_model, 1),
    }


# -- output ----------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    name = result["model"]
    lines = [
        f"### {name} (n = {result['n_eval']}; {result['metric']})",
        "",
        "| variant | score | agreement with fp32 | latency ms (median) | vs fp32 | vs INT8 original | vs INT8 prepared "
        "| eligible MAC ratio | convs rewritten |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in result["variants"].items():
        ratio = row.get("eligible_macs_ratio")
        kept = f"{row['convs_rewritten']}/{row['convs_eligible']}" if "convs_rewritten" in row else ""
        prepared = row.get("speedup_vs_int8_prepared")
        lines.append(
            f"| {label} | {row['score']:.3f} | {row['agreement_fp32']:.4f} | {row['latency_ms']:.2f} | "
            f"{row['speedup_vs_fp32']:.2f}× | {row['speedup_vs_int8_original']:.2f}× | "
            f"{'' if prepared is None else f'{prepared:.2f}×'} | {'' if ratio is None else f'{ratio:.3f}'} | {kept} |"
        )
    for label, err in result["errors"].items():
        lines.append(f"| {label} | FAILED: {err['error'][:120]} | | | | | | | |")
    return "\n".join(lines)


def save(out: Path, name: str, result: dict) -> None:
    data = {}
    if out.exists():
        try:
            data = json.loads(out.read_text())
        except ValueError:
            data = {}
    data["machine"] = {
        "cpus": available_cores(), "onnxruntime": ort.__version__, "python": platform.python_version(),
        "note": "2-core machine shared with other jobs; latencies from one interleaved run per model",
    }  # fmt: skip
    data.setdefault("models", {})[name] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(EVALUATIONS), choices=list(EVALUATIONS))
    parser.add_argument("--n", type=int, default=None, help="evaluation samples for the text models (default 1000)")
    parser.add_argument("--det-pages", type=int, default=None, help="evaluation pages for ppocr_det (default 300)")
    parser.add_argument("--samples", type=int, default=64, help="calibration feeds")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of interleaved timing (all variants)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / ".cache" / "int8_results.json")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=[*SETTINGS, *EXTRA_SETTINGS])
    parser.add_argument("--finetune-seconds", type=float, default=None,
                        help="also run each setting's INT8 rewrite fine-tuned for this long (needs the finetune extra)")
    parser.add_argument("--finetune-threads", type=int, default=1)
    args = parser.parse_args(argv)
    settings = {key: {**SETTINGS, **EXTRA_SETTINGS}[key] for key in args.settings}
    finetune = None if args.finetune_seconds is None else {
        "finetune_seconds": args.finetune_seconds, "finetune_threads": args.finetune_threads, "seed": 0}

    probe = install_probe()
    for name in args.models:
        n = (args.det_pages if name == "ppocr_det" else args.n) or DEFAULT_N[name]
        # A private per-run latency cache: every conv is timed afresh in this run (shared between its settings),
        # and the user's ~/.cache/dsrewrite is left alone.
        with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
            result = run_model(name, n, args.samples, args.budget, probe, Path(tmp) / "latency.json", settings, finetune)
        result["peak_rss_mib_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        save(args.out, name, result)
        print(markdown(result), flush=True)
        print(flush=True)
        log(f"{name}: total {result['total_seconds']:.0f}s; peak RSS per phase {result['peak_rss_mib']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
