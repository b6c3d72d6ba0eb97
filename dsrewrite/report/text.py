"""How the report reads: the one place that words its figures, layers, verdicts and settings.

Every view (terminal, Markdown, HTML, the SVG charts) formats through these helpers, from the
report's JSON dict (``Report.data()``), so the views cannot disagree on a number or a phrase.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..plan import REWRITTEN

# The terminal table collapses rows of identical configuration above this many layers; the
# Markdown table folds away and the MACs chart shrinks its rows past the same count.
COLLAPSE_OVER = 40

NO_CONVS = "Nothing to rewrite: the model has no Conv nodes."


def escape_html(value: Any) -> str:
    """Text for HTML or SVG, in element content or a quoted attribute."""
    return html.escape(str(value), quote=True)


def human(n: int | float | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "?"
    n = float(n)
    if not math.isfinite(n):
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def fmt_ratio(ratio: float | None) -> str:
    return "?" if ratio is None or not math.isfinite(ratio) else f"{ratio:.3f}"


def fmt_error(value: float | None) -> str:
    """Per-layer weight/output errors: '' when there is none."""
    return "" if value is None or not math.isfinite(value) else f"{value:.3f}"


def fmt_model_output_error(value: float | None) -> str:
    """Output-level errors span decades (1e-4 … 1): three significant digits, '' when there is none."""
    return "" if value is None or not math.isfinite(value) else f"{value:.3g}"


def fmt_stat(value: float | None) -> str:
    """Verification statistics (max_abs, mean_abs, max_rel, min_atol, min_rtol)."""
    return "?" if value is None or not math.isfinite(value) else f"{value:.3g}"


def fmt_cosine(value: float | None) -> str:
    return "?" if value is None or not math.isfinite(value) else f"{value:.6f}"


def fmt_ms(value: float | None) -> str:
    return "?" if value is None else f"{value:.3g} ms"


def fmt_speedup(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}×"


def fmt_value(value: Any) -> str:
    """Generic scalars (sweep points, extra benchmark fields)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "?"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_value(v) for v in value)
    return str(value)


def layer_cells(layer: Mapping[str, Any]) -> dict[str, str]:
    """The display text of one layer, from its JSON dict (``Report.data()["layers"][i]``).

    Keys: node, channels, kernel, group, decision, macs, macs_before, macs_after, ratio,
    params, params_before, params_after, weight_error, output_error, model_output_error (this conv alone,
    effect on the model's outputs, when the allocation measured it), latency (per-conv timing, when measured).
    """
    rewritten = layer.get("status") == REWRITTEN
    in_channels, out_channels = layer.get("in_channels"), layer.get("out_channels")
    kernel = layer.get("kernel")
    if rewritten:
        form = layer.get("form")
        decision = f"rank {layer.get('rank')}" + (f" ({form})" if form and form != "concat" else "")
    else:
        reason = layer.get("reason")
        decision = f"skip: {reason}" if reason else "skip"
    macs_before, macs_after = human(layer.get("macs_before")), human(layer.get("macs_after"))
    params_before, params_after = human(layer.get("params_before")), human(layer.get("params_after"))
    output_error = fmt_error(layer.get("output_error"))
    if output_error and layer.get("output_error_data_free") is not None:
        output_error += f" (data-free {fmt_error(layer.get('output_error_data_free'))})"
    if output_error and layer.get("fit_target") == "after-depthwise":
        output_error += " at the next depthwise conv"  # where this fit measures (and minimises) it
    if output_error and layer.get("activated_error") is not None:
        # The activated output's error, of the fit used; "linear" when the activation-aware one did not win.
        kept = "" if layer.get("fit_target") == "activated" else ", linear kept"
        output_error += f"; activated {fmt_error(layer.get('activated_error'))}{kept}"
    return {
        "node": layer.get("node") or "(unnamed)",
        "channels": f"{in_channels}→{out_channels}" if in_channels else "?",
        "kernel": "×".join(str(k) for k in kernel) if kernel else "?",
        "group": str(layer.get("group")),
        "decision": decision,
        "macs": f"{macs_before}→{macs_after}" if rewritten else macs_before,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "ratio": fmt_ratio(layer.get("macs_ratio")) if rewritten else "",
        "params": f"{params_before}→{params_after}" if rewritten else params_before,
        "params_before": params_before,
        "params_after": params_after,
        "weight_error": fmt_error(layer.get("weight_error")) if rewritten else "",
        "output_error": output_error if rewritten else "",
        "model_output_error": fmt_model_output_error(layer.get("model_output_error")) if rewritten else "",
        "latency": _latency_cell(layer.get("latency_before_ms"), layer.get("latency_after_ms")),
    }


def _latency_cell(before: float | None, after: float | None) -> str:
    if before is None and after is None:
        return ""
    return f"{fmt_ms(before)}→{fmt_ms(after)}" if after is not None and after != before else fmt_ms(before)


# -- verification: every view words the result with these, from ``Report.data()["verification"]`` --


def verdict(verification: Mapping[str, Any]) -> str:
    """'passed' (a tolerance held), 'compared' (no tolerance: the figures speak), 'FAILED' or 'not run'."""
    if not verification.get("ran"):
        return "not run"
    passed = verification.get("passed")
    return "compared" if passed is None else ("passed" if passed else "FAILED")


def tolerance_text(verification: Mapping[str, Any]) -> str:
    atol, rtol = verification.get("atol"), verification.get("rtol")
    if atol is None and rtol is None:
        return "no tolerance set (shapes, dtypes and finiteness only)"
    return f"atol={atol or 0:g}, rtol={rtol or 0:g}"


def verification_scope(verification: Mapping[str, Any], escape: Callable[[str], str] = str) -> str:
    """What a verdict that ran was reached on: '1 random (seed 0) sample(s); atol=0.0001, rtol=0.001'.

    ``escape`` makes each piece safe for the view's markup (the inputs label is free text).
    """
    samples, inputs = str(verification.get("samples")), str(verification.get("inputs", ""))
    return f"{escape(samples)} {escape(inputs)} sample(s); {escape(tolerance_text(verification))}"


def output_cells(output: Mapping[str, Any]) -> dict[str, str]:
    """Display text of one verified output."""
    return {
        "name": str(output.get("name")),
        "shape": "×".join(str(d) for d in output.get("shape") or []) or "scalar",
        "max_abs": fmt_stat(output.get("max_abs")),
        "mean_abs": fmt_stat(output.get("mean_abs")),
        "max_rel": fmt_stat(output.get("max_rel")),
        "cosine": fmt_cosine(output.get("cosine")),
        "min_atol": fmt_stat(output.get("min_atol")),
        "min_rtol": fmt_stat(output.get("min_rtol")),
        "passed": "yes" if output.get("passed") else "no",
        # Top-1 agreement with the original (argmax over the last axis of class/sequence scores): a figure users read.
        "agreement": "–" if output.get("argmax_agreement") is None else f"{output['argmax_agreement']:.1%}",
    }


# Benchmark dicts are free-form; these keys are read for the latency summary.
_LATENCY_BEFORE = ("latency_ms_before", "before_ms", "ms_before", "latency_before_ms", "original_ms")
_LATENCY_AFTER = ("latency_ms_after", "after_ms", "ms_after", "latency_after_ms", "rewritten_ms")


def benchmark_figures(benchmark: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Latency before/after (ms) and speedup from ``report.benchmark``, plus its other scalar fields."""
    if benchmark is None:
        return None

    def first(keys):
        for key in keys:
            value = benchmark.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        return None

    before, after = first(_LATENCY_BEFORE), first(_LATENCY_AFTER)
    speedup = first(("speedup",))
    if speedup is None and before is not None and after:
        speedup = before / after
    used = set(_LATENCY_BEFORE) | set(_LATENCY_AFTER) | {"speedup"}
    extras = {k: v for k, v in benchmark.items() if k not in used and not isinstance(v, dict)}
    return {"before_ms": before, "after_ms": after, "speedup": speedup, "extras": extras}


# A benchmark's speedups: "speedup" (against the original, at its "threads"), "speedup_vs_<reference>" and either
# with "_<N>_threads" for another thread count. "speedup_vs_predicted" is a ratio of ratios, not a speedup.
_SPEEDUP_KEY = re.compile(r"^speedup(?:_vs_(?P<versus>(?!predicted).+?))?(?:_(?P<threads>\d+)_threads)?$")


def speedups(benchmark: Mapping[str, Any] | None) -> list[tuple[str, float, str | None, int | None]]:
    """``(key, value, reference or None for the original, thread count or None for the headline one)`` of each
    measured speedup in ``benchmark``: the one reading of its keys, for the report and for the warnings."""
    found = []
    for key, value in (benchmark or {}).items():
        match = _SPEEDUP_KEY.match(key)
        if match is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append((key, float(value), match["versus"], int(match["threads"]) if match["threads"] else None))
    return found


def comparisons_text(benchmark: Mapping[str, Any] | None) -> str | None:
    """The speedups beyond the headline one, e.g. "1.02× at 2 threads; 1.06× against the int8 without rewrite", or None.

    A reference whose conv share of run time was profiled also gets what the conv MAC ratio predicts over it and
    what convs taking no time at all would give (Amdahl's limit for any conv rewrite), e.g. "(its conv kernels are
    59% of its time: MAC-predicted 1.38×, convs at zero time 2.41×)".
    """
    parts = []
    for key, value, versus, threads in speedups(benchmark):
        if key == "speedup":
            continue
        part = fmt_speedup(value) + (f" against the {versus.replace('_', ' ')}" if versus else "")
        part += f" at {threads} threads" if threads else ""
        share, ceiling, predicted = (
            (benchmark.get(f"{name}_{versus}") for name in ("conv_time_share", "ceiling_vs", "predicted_speedup_vs"))
            if versus else (None, None, None)
        )  # fmt: skip
        if threads is None and isinstance(share, float) and isinstance(ceiling, float):
            mac_predicted = f"MAC-predicted {fmt_speedup(predicted)}, " if isinstance(predicted, float) else ""
            part += f" (its conv kernels are {share:.0%} of its time: {mac_predicted}convs at zero time {fmt_speedup(ceiling)})"
        parts.append(part)
    return "; ".join(parts) or None


def convs_text(totals: Mapping[str, Any]) -> str:
    """'5 rewritten, 1 skipped of 6 (5 eligible).' from the totals dict."""
    return (
        f"{totals['rewritten']} rewritten, {totals['skipped']} skipped of {totals['convs']} "
        f"({totals['eligible']} eligible)."
    )


def passes_text(passes: Sequence[Mapping[str, Any]]) -> str:
    """'fold_batchnorm (0 changes, 0.00s), decompose_conv (6 changes, 0.01s), ...'"""
    return ", ".join(f"{p['name']} ({p['changes']} changes, {p['seconds']:.2f}s)" for p in passes)


def model_title(model: Mapping[str, Any]) -> str:
    source = model.get("input") or "model"
    return Path(source).name if source != "<ModelProto>" else source


def settings_text(settings: Mapping[str, Any]) -> str:
    """'rank=2, max_error=0.1, ...' without the unset ones."""
    parts = []
    for key, value in settings.items():
        if value is None or value in ("", [], {}, ()):
            continue
        if isinstance(value, dict):
            value = "; ".join(f"{k}:{fmt_value(v)}" for k, v in value.items())
        parts.append(f"{key}={fmt_value(value)}")
    return ", ".join(parts)


def sweep_columns(sweep: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sweep table's columns: every scalar key of any point, in first-seen order."""
    columns: list[str] = []
    for point in sweep:
        for key in point:
            if key not in columns and not isinstance(point[key], (dict, list, tuple)):
                columns.append(key)
    return columns


def sweep_cell(key: str, value: Any) -> str:
    if key == "eligible_macs_ratio" or key.endswith("_ratio"):
        return fmt_ratio(value) if value is not None else ""
    if key in ("estimated_error", "score") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt_stat(value)
    return fmt_value(value)
