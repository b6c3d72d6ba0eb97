"""Measured speedup of whole rewritten models against the Amdahl prediction, on real pretrained models.

For each model: rewrite at ``--target-macs`` (default 0.5) with calibration data, then time the original and
the rewritten model in onnxruntime (``ORT_ENABLE_ALL``, interleaved runs, medians) and compare the measured
speedup with ``1 / ((1 - f) + f·ratio)``, where ``f`` is the original's conv share of run time (onnxruntime
profiler) and ``ratio`` the conv MAC ratio. Also reports the task score.

Each model is rewritten once per ``--timing`` mode: ``in-place`` (decisions from whole models profiled at
``--threads`` and at the core count, the default) and ``alone`` (each conv timed alone). Speed is measured at
``--threads`` and at the core count; the score comes with paired agreement with the original.

Usage:
    python bench/latency.py [--models captcha_crnn ...] [--target 0.5] [--threads 1] [--no-latency-aware]
                            [--timing in-place alone] [--n N] [--min-efficiency E]

``--min-efficiency E`` sets ``dsrewrite.decide.MIN_EFFICIENCY`` for the run (the share of its MAC-predicted time
saving a rank must realise to be preferred under a MAC budget), to study the efficiency/accuracy trade-off.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import INPUT_SHAPES  # noqa: E402
from evaluations import EVALUATIONS, agreement, calibration_feeds, predict  # noqa: E402
from models import fetch  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite import decide, latency  # noqa: E402
from dsrewrite.cores import available_cores  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(EVALUATIONS), choices=list(EVALUATIONS))
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--latency-aware", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--timing", nargs="+", default=["in-place", "alone"], choices=["in-place", "alone"])
    parser.add_argument("--min-efficiency", type=float, default=None, help="override decide.MIN_EFFICIENCY")
    args = parser.parse_args(argv)
    cores = available_cores()
    if args.min_efficiency is not None:
        decide.MIN_EFFICIENCY = args.min_efficiency

    print(
        "| model | timing | eligible MAC ratio | conv share of time | latency before → after (ms) | speedup | Amdahl | "
        f"of Amdahl | speedup at {cores} threads | score before → after | agreement | rewrite took |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        path = fetch(name)
        feeds = calibration_feeds(name, n=args.samples)
        original = dsrewrite.load_model(path)
        feed = feeds[0]
        share = latency.conv_time_share(original, feed, threads=args.threads)
        reference = predict(name, path, n=args.n)
        for timing in args.timing:
            start = time.perf_counter()
            result = dsrewrite.rewrite(
                path, target_macs=args.target, calibration=feeds, verify=False, input_shapes=INPUT_SHAPES[name],
                latency_aware=args.latency_aware, threads=args.threads, in_place_timing=timing == "in-place",
            )  # fmt: skip
            took = time.perf_counter() - start
            bench = latency.benchmark_models(original, result.model, feed, threads=args.threads, budget_seconds=10.0)
            more = latency.benchmark_models(original, result.model, feed, threads=cores, budget_seconds=10.0)
            totals = result.report.totals
            predicted = latency.amdahl(share, totals.macs_ratio)
            of_amdahl = (bench["speedup"] - 1.0) / (predicted - 1.0) if predicted > 1 else float("nan")
            rewritten = predict(name, result.model, n=args.n)
            print(
                f"| {name} | {timing} | {totals.eligible_macs_ratio:.3f} | {share:.2f} | "
                f"{bench['latency_before_ms']:.2f} → {bench['latency_after_ms']:.2f} | {bench['speedup']:.2f}× | "
                f"{predicted:.2f}× | {of_amdahl:.0%} | {more['speedup']:.2f}× | {reference.score:.3f} → "
                f"{rewritten.score:.3f} | {agreement(reference, rewritten):.3f} | {took:.0f} s |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
