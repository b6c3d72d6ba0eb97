"""Task score at 2×, 3× and 4× eligible-MAC cuts: data-free SVD, the linear fit, the activation-aware fit, the default.

For each real pretrained model and each setting (``--target-macs`` 0.5, 0.333,
0.25, and the uniform ranks given), rewrite with

* ``data-free``: plain per-channel SVD (no calibration);
* ``linear``: whitened SVD + pointwise/bias least squares + ALS rounds, fitted
  wave by wave on the rewritten model's inputs against each conv's own output
  (sequential; ``--linear-fit``);
* ``activation-aware``: the same, then refined so each conv's *activated* output
  matches the original's where an activation follows;
* ``default``: dsrewrite's default with ``--calibration``: the activation-aware fit,
  and convs whose output reaches a depthwise conv linearly fitted at that conv's
  output (``composed_fit``);
* ``fine-tuned``: the default fit, then the new factors distilled
  against the original model's outputs on the same feeds
  (``--finetune-seconds``; needs the ``finetune`` extra);

and score each on its labelled evaluation, with the share of decisions that
agree with the original model's next to it. Calibration feeds and evaluation
sets come from different seeds. ``--target-macs`` settings are allocated once
(with the default options, as a user's run would) and reused, so all methods
compare at the same ranks.

Usage:
    python bench/distill.py [--models captcha_crnn ...] [--targets 0.5 0.333 0.25] [--ranks 2 4] [--samples 64] [--n 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations import EVALUATIONS, agreement, calibration_feeds, predict  # noqa: E402
from models import fetch  # noqa: E402

import dsrewrite  # noqa: E402
from dsrewrite.distill import DistillOptions  # noqa: E402

# Fixed input shapes for costing (the OCR models have dynamic spatial dims); the sizes their evaluations use.
INPUT_SHAPES = {
    "captcha_crnn": {"image": (1, 3, 60, 160)},
    "ppocr_rec": {"x": (1, 3, 48, 320)},
    "ppocr_cls": {"x": (1, 3, 48, 192)},
    "ppocr_det": {"x": (1, 3, 736, 736)},
    "yolox_det": {"images": (1, 3, 416, 416)},
}

METHODS = {
    "data-free": None,
    "linear": DistillOptions(sequential=True, activation_aware=False, through_depthwise=False),
    "activation-aware": DistillOptions(sequential=True, activation_aware=True, through_depthwise=False),
    "default": DistillOptions(sequential=True),
    "fine-tuned": DistillOptions(sequential=True),  # + fine-tuning (see FINETUNED)
}
FINETUNED = "fine-tuned"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(EVALUATIONS), choices=list(EVALUATIONS))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.333, 0.25])
    parser.add_argument("--ranks", nargs="+", type=int, default=[])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n", type=int, default=None, help="evaluation set size (default per model)")
    parser.add_argument("--finetune-seconds", type=float, default=300.0, help="fine-tuning budget per rewrite")
    parser.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning step cap per rewrite")
    parser.add_argument("--threads", type=int, default=None, help="fine-tuning threads (default: every core)")
    args = parser.parse_args(argv)

    print("| model | setting | eligible MAC ratio | " + " | ".join(args.methods) + " | tool time (linear → aware → default → fine-tuned) |")
    print("|---|---|---|" + "---|" * len(args.methods) + "---|")
    for name in args.models:
        path = fetch(name)
        shapes = INPUT_SHAPES[name]
        original = predict(name, path, n=args.n)
        print(f"| {name} | original | 1.000 | " + " | ".join(f"{original.score:.3f}" for _ in args.methods) + " | |", flush=True)
        feeds = calibration_feeds(name, n=args.samples)
        settings = [(f"--target-macs {t:g}", {"target_macs": t}) for t in args.targets]
        settings += [(f"--rank {r}", {"rank": r}) for r in args.ranks]
        for label, setting in settings:
            if "target_macs" in setting:
                # Allocate once, then fit every method at those ranks.
                allocated = dsrewrite.rewrite(path, **setting, verify=False, input_shapes=shapes, calibration=feeds,
                                              distill=METHODS["default"], latency_aware=False, benchmark=False)  # fmt: skip
                setting = {"plan": allocated.plan_document()}
            cells, ratio, times = [], None, {}
            for method in args.methods:
                options = METHODS[method]
                tuning = {}
                if method == FINETUNED:
                    tuning = {"finetune_seconds": args.finetune_seconds, "finetune_steps": args.finetune_steps,
                              "finetune_threads": args.threads}  # fmt: skip
                start = time.perf_counter()
                result = dsrewrite.rewrite(
                    path, **setting, verify=False, input_shapes=shapes, benchmark=False,
                    calibration=None if options is None else feeds, distill=options, **tuning,
                )  # fmt: skip
                times[method] = time.perf_counter() - start
                ratio = result.report.totals.eligible_macs_ratio
                scored = predict(name, result.model, n=args.n)
                cells.append(f"{scored.score:.3f} ({agreement(scored, original):.3f})")
                if method in ("activation-aware", "default"):
                    kept = sum(1 for p in result.report.layers if p.fit_target == "activated")
                    aware = sum(1 for p in result.report.layers if p.activated_error is not None)
                    cells[-1] += f" [{kept}/{aware}]"
                if method == FINETUNED and result.report.finetune:
                    tuned = result.report.finetune
                    cells[-1] += f" [{tuned.get('steps', 0)} steps, {tuned.get('seconds', 0):.0f}s]"
            fit_time = " → ".join(f"{times[m]:.0f}s" for m in ("linear", "activation-aware", "default", FINETUNED) if m in times)
            print(f"| {name} | {label} | {ratio:.3f} | " + " | ".join(cells) + f" | {fit_time} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
