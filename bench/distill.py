"""Task score against eligible-MAC ratio: data-free SVD versus fitting to calibration data.

For each real pretrained model and each uniform rank, rewrite with

* ``data-free``: plain per-channel SVD (no calibration);
* ``whitened``: whitened per-channel SVD, original pointwise/bias (independent);
* ``refit``: whitened SVD + pointwise/bias least squares + ALS rounds, every conv
  fitted on the original model's inputs (independent);
* ``sequential``: the same fitted wave by wave on the rewritten model's inputs
  (dsrewrite's default with ``--calibration``);

and score each on its labelled evaluation. Calibration feeds and evaluation
sets come from different seeds.

Usage:
    python bench/distill.py [--models captcha_crnn ppocr_rec ...] [--ranks 1 2 4] [--samples 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations import EVALUATIONS, calibration_feeds, evaluate  # noqa: E402
from models import fetch  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.distill import DistillOptions  # noqa: E402

# Fixed input shapes for costing (the OCR models have dynamic spatial dims); the sizes their evaluations use.
INPUT_SHAPES = {
    "captcha_crnn": {"image": (1, 3, 60, 160)},
    "ppocr_rec": {"x": (1, 3, 48, 320)},
    "ppocr_cls": {"x": (1, 3, 48, 192)},
    "ppocr_det": {"x": (1, 3, 736, 736)},
}

METHODS = {
    "data-free": None,
    "whitened": DistillOptions(sequential=False, refit=False),
    "refit": DistillOptions(sequential=False),
    "sequential": DistillOptions(sequential=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(EVALUATIONS), choices=list(EVALUATIONS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n", type=int, default=None, help="evaluation set size (default per model)")
    args = parser.parse_args(argv)

    print("| model | rank | eligible MAC ratio | " + " | ".join(args.methods) + " | fit time (sequential) |")
    print("|---|---|---|" + "---|" * len(args.methods) + "---|")
    for name in args.models:
        path = fetch(name)
        original = evaluate(name, path, n=args.n)
        print(f"| {name} | original | 1.000 | " + " | ".join(f"{original:.3f}" for _ in args.methods) + " | |", flush=True)
        feeds = calibration_feeds(name, n=args.samples)
        for rank in args.ranks:
            scores, ratio, fit_time = [], None, ""
            for method in args.methods:
                options = METHODS[method]
                start = time.perf_counter()
                result = dsrewrite.rewrite(
                    path, rank=rank, verify=False, input_shapes=INPUT_SHAPES[name],
                    calibration=None if options is None else feeds, distill=options,
                )  # fmt: skip
                elapsed = time.perf_counter() - start
                if method == "sequential":
                    fit_time = f"{elapsed:.1f}s"
                ratio = result.report.totals.eligible_macs_ratio
                scores.append(evaluate(name, result.model, n=args.n))
            print(f"| {name} | {rank} | {ratio:.3f} | " + " | ".join(f"{s:.3f}" for s in scores) + f" | {fit_time} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
