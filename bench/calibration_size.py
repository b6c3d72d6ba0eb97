"""Task score against the number of calibration samples (64, 256, 1024), with fit time and peak memory.

Each sample count runs in its own process (so its peak RSS is its own): it
builds the feeds with ``calibration_feeds(name, n)``, rewrites at one setting
(default ``--rank 4``) with the default fit (sequential, activation-aware), and
scores the result on the labelled evaluation with paired agreement. Position
sampling per feed shrinks beyond 64 feeds (``calibration.positions_per_feed``),
so the fit's statistics cost about the same at every count; the capture passes
through onnxruntime still grow with the count.

Memory is reported three ways: the RSS the rendered feeds add (the bench holds
them in a list, as a library caller would; a directory of ``.npz`` feeds is read
one file at a time instead), the process's peak RSS (``ru_maxrss``, taken right
after the rewrite, before the evaluation), and the rewrite's own share of it:
peak minus the RSS just before ``rewrite()``. Time is the wall clock of
``rewrite()`` (error curves, output-level probes, allocation, capture and fit)
and the per-layer fit seconds summed (``fit_seconds``: patches, statistics and
solves, not the onnxruntime capture).

With ``--target-macs`` the ranks are allocated on each count's own feeds (the
output-level probe uses 8 of them, spread over the set), so the plan may differ
between counts. ``--fixed-plan`` allocates once, on the first count's feeds, and
fits every count at that plan: only the fit sees the extra samples.

Usage:
    python bench/calibration_size.py [--model captcha_crnn] [--samples 64 256 1024] [--rank 4 | --target-macs 0.5] [--n 1000]
        [--fixed-plan] [--json results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(args) -> dict:
    from distill import INPUT_SHAPES  # noqa: PLC0415
    from evaluations import agreement, calibration_feeds, predict  # noqa: PLC0415
    from models import fetch  # noqa: PLC0415

    import dsrewrite  # noqa: PLC0415

    path = fetch(args.model)
    before_feeds = _rss_mib()
    feeds = calibration_feeds(args.model, n=args.one)
    before_rewrite = _rss_mib()
    setting = {"rank": args.rank} if args.target_macs is None else {"target_macs": args.target_macs, "latency_aware": False}
    label = dict(setting)
    if args.plan is not None and args.plan.exists():
        setting = {"plan": json.loads(args.plan.read_text())}
        label["plan"] = "fixed"
    start = time.perf_counter()
    result = dsrewrite.rewrite(path, **setting, calibration=feeds, verify=False, benchmark=False, input_shapes=INPUT_SHAPES[args.model])
    seconds = time.perf_counter() - start
    if args.plan is not None and not args.plan.exists():
        args.plan.write_text(json.dumps(result.plan_document()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    original = predict(args.model, path, n=args.n)
    scored = predict(args.model, result.model, n=args.n)
    fit_seconds = sum(layer.fit_seconds or 0.0 for layer in result.report.layers)
    return {
        "model": args.model, "samples": args.one, "setting": label, "n": args.n,
        "ratio": result.report.totals.eligible_macs_ratio, "score": scored.score,
        "original": original.score, "agreement": agreement(scored, original), "seconds": seconds,
        "fit_seconds": fit_seconds, "peak_mib": peak, "feeds_mib": before_rewrite - before_feeds,
        "rewrite_peak_mib": peak - before_rewrite,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="captcha_crnn")
    parser.add_argument("--samples", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--target-macs", type=float, default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--fixed-plan", action="store_true", help="allocate once (first count), fit every count at that plan")
    parser.add_argument("--plan", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="append each sample count's result as one JSON line")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args)))
        return 0
    print(
        "| model | samples | eligible MAC ratio | score (agreement) | original | rewrite time | fit time "
        "| peak RSS | feeds | rewrite's share of peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    plan_dir = tempfile.TemporaryDirectory(prefix="calibration-size-")
    for n in args.samples:
        command = [sys.executable, __file__, "--model", args.model, "--rank", str(args.rank), "--one", str(n)]
        if args.fixed_plan:
            command += ["--plan", str(Path(plan_dir.name) / "plan.json")]
        if args.target_macs is not None:
            command += ["--target-macs", str(args.target_macs)]
        if args.n is not None:
            command += ["--n", str(args.n)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        line = out.strip().splitlines()[-1]
        r = json.loads(line)
        if args.json is not None:
            with args.json.open("a") as f:
                f.write(line + "\n")
        print(
            f"| {args.model} | {n} | {r['ratio']:.3f} | {r['score']:.3f} ({r['agreement']:.3f}) | {r['original']:.3f} | "
            f"{r['seconds']:.0f}s | {r['fit_seconds']:.0f}s | {r['peak_mib']:.0f} MiB | {r['feeds_mib']:.0f} MiB | "
            f"{r['rewrite_peak_mib']:.0f} MiB |",
            flush=True,
        )
    plan_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
