"""Rank allocation at equal MACs: uniform rank vs layer-NMSE allocation vs output-level allocation.

For each model and each eligible-MAC cut (2×, 3×, 4×: targets 0.5, 0.333, 0.25), take the uniform rank whose
eligible-MAC ratio is nearest the target, then allocate ``--target-macs`` set to *that rank's ratio* (so the
allocations spend at most the uniform rank's MACs) in two ways:

* ``layer``: on each conv's own output NMSE (``allocate_by="layer"``);
* ``output``: on each conv's effect on the model's outputs, re-measured once (``allocate_by="output"``).

All three use the default calibration fit (sequential, ``--samples`` calibration feeds) and run with
``latency_aware=False``, so timing noise cannot move a decision. Each rewrite is scored on the model's labelled
task, next to its paired agreement with the original model's decisions.

Usage:
    python bench/allocation.py [--models captcha_crnn ppocr_rec ppocr_det] [--cuts 0.5 0.333 0.25] [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import INPUT_SHAPES  # noqa: E402
from evaluations import agreement, calibration_feeds, predict  # noqa: E402
from models import fetch  # noqa: E402

import dsrewrite  # noqa: E402

DEFAULT_N = {"captcha_crnn": 1000, "ppocr_rec": 1000, "ppocr_cls": 1000, "ppocr_det": 100}


def uniform_ratios(path, shapes, ranks=range(1, 17)) -> dict[int, float]:
    """Eligible-MAC ratio of each uniform rank (dry runs: no data, no fit)."""
    ratios = {}
    for rank in ranks:
        report = dsrewrite.rewrite(path, rank=rank, dry_run=True, verify=False, input_shapes=shapes).report
        ratios[rank] = report.totals.eligible_macs_ratio
        if ratios[rank] >= 0.999:
            break
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["captcha_crnn", "ppocr_rec", "ppocr_det"], choices=list(INPUT_SHAPES))
    parser.add_argument("--cuts", nargs="+", type=float, default=[0.5, 0.333, 0.25])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--n", type=int, default=None, help="evaluation set size (default: 1000; ppocr_det 100 pages)")
    parser.add_argument("--jsonl", type=Path, default=None, help="also append one JSON line per row here")
    args = parser.parse_args(argv)

    print("| model | cut | method | eligible MAC ratio | score | Δ points | agreement | rewrite s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.models:
        path, shapes, n = fetch(name), INPUT_SHAPES[name], args.n or DEFAULT_N[name]
        reference = predict(name, path, n=n)
        print(f"| {name} | – | original | 1.000 | {reference.score:.3f} | | | |", flush=True)
        feeds = calibration_feeds(name, n=args.samples)
        ratios = uniform_ratios(path, shapes)
        for cut in args.cuts:
            rank = min(ratios, key=lambda r: (abs(ratios[r] - cut), r))
            runs = [("uniform", {"rank": rank}), ("layer", {"target_macs": ratios[rank], "allocate_by": "layer"}),
                    ("output", {"target_macs": ratios[rank], "allocate_by": "output"})]  # fmt: skip
            for method, options in runs:
                start = time.perf_counter()
                result = dsrewrite.rewrite(
                    path, calibration=feeds, verify=False, latency_aware=False, input_shapes=shapes, **options
                )  # fmt: skip
                seconds = time.perf_counter() - start
                got = predict(name, result.model, n=n)
                ratio = result.report.totals.eligible_macs_ratio
                label = f"rank {rank}" if method == "uniform" else f"{method} @ {ratios[rank]:.3f}"
                row = {
                    "model": name, "cut": cut, "method": method, "label": label, "ratio": ratio, "score": got.score,
                    "original": reference.score, "agreement": agreement(reference, got), "seconds": seconds,
                    "ranks": {layer.node: layer.rank for layer in result.report.layers if layer.eligible},
                    "notes": [note for note in result.report.notes if "output" in note or "target-macs" in note],
                }  # fmt: skip
                print(
                    f"| {name} | {1 / cut:.0f}× | {label} | {ratio:.3f} | {got.score:.3f} | "
                    f"{100 * (got.score - reference.score):+.1f} | {row['agreement']:.3f} | {seconds:.0f} |",
                    flush=True,
                )
                for note in row["notes"]:
                    print(f"  note: {note}", file=sys.stderr, flush=True)
                if args.jsonl is not None:
                    with args.jsonl.open("a") as out:
                        out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
