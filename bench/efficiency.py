"""Where a MAC cut's time goes: whole-model speedup against the MAC prediction, and each rewritten conv in place.

For each model: rewrite at ``--target-macs`` (latency-aware, the CLI's defaults; data-free, so it needs no
labelled task and runs on the unlabelled detectors too), then

* time the original and the rewrite interleaved (``ORT_ENABLE_ALL``, ``--threads``, ``--rounds`` rounds of
  ``--seconds`` each, medians) and compare with the Amdahl prediction from the conv MAC ratio and the original's
  conv share of run time (onnxruntime profiler): "of Amdahl" is (measured − 1) / (predicted − 1);
* profile both models and attribute every node's kernel time to the conv it came from
  (``dsrewrite.in_model.in_model_times``: through onnxruntime's fusions and NCHWc renaming), so each rewritten conv
  gets its time ratio in place next to its MAC ratio. A time ratio above the MAC ratio is MACs that did not turn
  into time; the sum over the rewritten convs against the whole-model saving says whether anything outside them
  (layout reorders, lost fusions) was lost.

Usage:
    python bench/efficiency.py [--models yolox_det yolov8n_320 ...] [--target 0.5] [--threads 1]
                               [--rounds 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import INPUT_SHAPES  # noqa: E402
from models import MODELS, fetch  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite import latency, stages  # noqa: E402
from dsrewrite.context import RewriteContext  # noqa: E402
from dsrewrite.decide import apply_decisions  # noqa: E402
from dsrewrite.in_model import in_model_times, timing_candidate  # noqa: E402
from dsrewrite.options import RewriteOptions  # noqa: E402
from dsrewrite.plan import Decision, Decisions  # noqa: E402
from dsrewrite.verify import random_feeds  # noqa: E402

SHAPES = {
    **INPUT_SHAPES,
    "yolov8n_320": {"images": (1, 3, 320, 320)},  # dynamic dims in the file
}


def attribute(path: str, shapes: dict, layers, threads: int) -> tuple[list[dict], float, float]:
    """Per rewritten conv: its in-place time before and after; and both models' total kernel time."""
    ctx = RewriteContext.open(path, RewriteOptions.of(input_shapes=shapes, rank=1, benchmark=False))
    preparing, _finishing = stages.split_passes(ctx)
    stages.prepare(ctx, preparing)
    plans = stages.analyse(ctx)
    by_node = {p.node: p for p in plans}
    decisions = {p.output: Decision(None, "not rewritten") for p in plans if p.eligible}
    decisions |= {by_node[layer.node].output: Decision(layer.rank, form=layer.form) for layer in layers}
    candidates = [replace(p, notes=list(p.notes)) for p in plans]
    apply_decisions(candidates, Decisions(decisions))
    rewritten, owners = timing_candidate(ctx, candidates, "attribution")  # data-free factors: same speed
    feed = ctx.one_feed()
    keys = {p.output: p.output for p in plans} | {p.node: p.output for p in plans if p.node}
    times_before = latency.node_times(ctx.model, feed, threads=threads, runs=30)
    times_after = latency.node_times(rewritten, feed, threads=threads, runs=30)
    before, _ = in_model_times(ctx.model, times_before, keys)
    after, _ = in_model_times(rewritten, times_after, owners)
    rows = []
    for plan in candidates:
        if plan.rewritten and plan.output in before and plan.output in after:
            rows.append({
                "node": plan.node, "channels": f"{plan.in_channels}→{plan.out_channels}", "rank": plan.rank,
                "form": plan.form, "before_ms": before[plan.output], "after_ms": after[plan.output],
                "mac_ratio": plan.macs_after / plan.macs_before,
            })  # fmt: skip
    total = lambda times: sum(ms for _op, ms in times.values())  # noqa: E731
    return rows, total(times_before), total(times_after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["yolox_det", "yolov8n_320"], choices=sorted(SHAPES))
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    assert set(args.models) <= set(MODELS), "every model must be fetchable"

    for name in args.models:
        path, shapes = str(fetch(name)), {k: list(v) for k, v in SHAPES[name].items()}
        result = dsrewrite.rewrite(path, target_macs=args.target, input_shapes=shapes, threads=args.threads,
                                   benchmark=False)  # fmt: skip
        totals = result.report.totals
        original = dsrewrite.load_model(path)
        feed = random_feeds(original, shapes, seed=0)  # the feed the tool itself times a data-free run on
        share = latency.conv_time_share(original, feed, threads=args.threads)
        predicted = latency.amdahl(share, totals.macs_ratio)
        print(f"\n### {name}: --target-macs {args.target:g}, {totals.rewritten} of {totals.eligible} eligible convs "
              f"rewritten, eligible MACs {totals.eligible_macs_ratio:.3f}, conv MACs {totals.macs_ratio:.3f}, conv "
              f"share of time {share:.2f}, predicted {predicted:.3f}x\n")  # fmt: skip
        print("| round | before (ms) | after (ms) | speedup | of Amdahl |")
        print("|---|---|---|---|---|")
        for index in range(args.rounds):
            timed = latency.benchmark_models(original, result.model, feed, threads=args.threads, budget_seconds=args.seconds)
            before, after, speedup = timed["latency_before_ms"], timed["latency_after_ms"], timed["speedup"]
            print(f"| {index + 1} | {before:.2f} | {after:.2f} | {speedup:.3f}x | {(speedup - 1) / (predicted - 1):.0%} |",
                  flush=True)  # fmt: skip
        layers = [layer for layer in result.report.layers if layer.rewritten]
        rows, total_before, total_after = attribute(path, shapes, layers, args.threads)
        print("\n| conv | channels | rank, form | in place before → after (ms) | time ratio | MAC ratio |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['node']} | {row['channels']} | {row['rank']}, {row['form']} | {row['before_ms']:.3f} → "
                  f"{row['after_ms']:.3f} | {row['after_ms'] / row['before_ms']:.3f} | {row['mac_ratio']:.3f} |")  # fmt: skip
        saved = sum(r["before_ms"] - r["after_ms"] for r in rows)
        ideal = sum(r["before_ms"] * (1 - r["mac_ratio"]) for r in rows)
        print(f"\nProfiled kernel time {total_before:.2f} → {total_after:.2f} ms: the rewritten convs save {saved:.2f} ms "
              f"in place (their MACs predict {ideal:.2f}); everything else changes by "
              f"{(total_after - total_before) + saved:+.2f} ms.")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
