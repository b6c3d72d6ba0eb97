"""Fine-tuning at a deep cut: the closed-form fit against the fit distilled for a time budget, at one plan.

For each model: allocate the ranks once for ``--target-macs`` on ``--plan-samples`` calibration feeds (the
output-level allocation, latency-unaware, as a dry run), then rewrite at that plan on ``--samples`` feeds twice:
the closed-form fit alone, and the fit fine-tuned for ``--seconds`` (``--finetune-threads``, each ``--seeds``).
Every model is scored on its labelled evaluation, with the share of decisions that agree with the original.

Allocating on 64 feeds and fitting on 256 is the combination that scored best on captcha_crnn (a 256-feed
allocation spends the budget worse; see bench/README). Fine-tuning needs the ``finetune`` extra.

Usage:
    python bench/finetune.py --models captcha_crnn --target 0.25 [--plan-samples 64] [--samples 256] \
        [--seconds 600] [--threads 1] [--seeds 0 1] [--n 1000]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["captcha_crnn"], choices=sorted(EVALUATIONS))
    parser.add_argument("--target", type=float, default=0.25, help="--target-macs of the plan")
    parser.add_argument("--plan-samples", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256, help="calibration feeds for the fit and fine-tuning")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="one fine-tuned run per seed (none: the fit only)")
    parser.add_argument("--n", type=int, default=None, help="evaluation samples (default: the evaluation's own)")
    args = parser.parse_args(argv)

    print("| model | setting | eligible MAC ratio | score (agreement) | steps | best step | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        path = str(fetch(name))
        shapes = INPUT_SHAPES.get(name, {})
        common = dict(latency_aware=False, benchmark=False, input_shapes=shapes)
        plan = dsrewrite.rewrite(
            path, target_macs=args.target, calibration=calibration_feeds(name, args.plan_samples), dry_run=True, **common
        ).plan_document()
        original = predict(name, path, args.n)
        print(f"| {name} | original | 1.000 | {original.score:.3f} | | | |", flush=True)
        feeds = calibration_feeds(name, args.samples)
        runs = [("closed-form fit", {})] + [
            (f"fine-tuned {args.seconds:g} s, {args.threads} thread(s), seed {seed}",
             dict(finetune_seconds=args.seconds, finetune_threads=args.threads, seed=seed))
            for seed in args.seeds
        ]  # fmt: skip
        for label, extra in runs:
            start = time.perf_counter()
            result = dsrewrite.rewrite(path, plan=plan, calibration=feeds, **common, **extra)
            wall = time.perf_counter() - start
            scored = predict(name, result.model, args.n)
            ratio = result.report.totals.eligible_macs_ratio
            summary = result.report.finetune or {}
            print(
                f"| {name} | {label} | {ratio:.3f} | {scored.score:.3f} ({agreement(original, scored):.3f}) "
                f"| {summary.get('steps', '')} | {summary.get('best_step', '')} | {wall:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
