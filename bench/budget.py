"""MAC-budget allocation against uniform rank, at equal eligible MACs, on real pretrained models.

For each uniform rank, rewrite with calibration (sequential fitting), note its
eligible-MAC ratio, then rewrite with ``--target-macs`` set to that ratio
(ranks allocated per layer from calibrated error curves) and score both.

Usage:
    python bench/budget.py [--models captcha_crnn ...] [--ranks 2 4] [--targets 0.5] [--samples 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import INPUT_SHAPES  # noqa: E402
from evaluations import EVALUATIONS, calibration_feeds, evaluate  # noqa: E402
from models import fetch  # noqa: E402

import dsrewrite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(EVALUATIONS), choices=list(EVALUATIONS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--n", type=int, default=None)
    args = parser.parse_args(argv)

    print("| model | setting | eligible MAC ratio | score (uniform rank) | score (allocated) | original | time (allocated) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        path = fetch(name)
        shapes = INPUT_SHAPES[name]
        original = evaluate(name, path, n=args.n)
        feeds = calibration_feeds(name, n=args.samples)
        settings = [(f"rank {r}", r) for r in args.ranks] + [(f"target {t:g}", None) for t in args.targets]
        for label, rank in settings:
            uniform_score = ""
            if rank is not None:
                uniform = dsrewrite.rewrite(path, rank=rank, calibration=feeds, verify=False, input_shapes=shapes)
                ratio = uniform.report.totals.eligible_macs_ratio
                uniform_score = f"{evaluate(name, uniform.model, n=args.n):.3f}"
            else:
                ratio = float(label.split()[1])
            start = time.perf_counter()
            allocated = dsrewrite.rewrite(path, target_macs=ratio, calibration=feeds, verify=False, input_shapes=shapes)
            elapsed = time.perf_counter() - start
            achieved = allocated.report.totals.eligible_macs_ratio
            score = evaluate(name, allocated.model, n=args.n)
            print(
                f"| {name} | {label} | {achieved:.3f} (uniform {ratio:.3f}) | {uniform_score} | {score:.3f} | "
                f"{original:.3f} | {elapsed:.1f}s |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
