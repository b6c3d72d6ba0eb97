"""The savings report: one Report object, rendered as a terminal table, JSON, Markdown or HTML.

Only this module formats. Every number in every rendering comes from the same
:class:`Report`: the file formats all render :meth:`Report.data` (the JSON
dict, NaN/Inf as null) through the same cell helpers (:func:`layer_cells`,
:func:`human`, :func:`fmt_ratio`, ...), and the terminal table uses those
helpers too, so the views cannot disagree.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from .errors import UsageError
from .plan import REWRITTEN, LayerPlan
from .verify import VerificationResult

SCHEMA = "dsrewrite.report/1"

# File suffix -> renderer name. The CLI accepts the same suffixes.
FORMATS = {".json": "json", ".md": "markdown", ".html": "html"}

# The terminal table collapses rows of identical configuration above this many layers.
COLLAPSE_OVER = 40


@dataclass
class Totals:
    macs_before: int | None
    macs_after: int | None
    params_before: int
    params_after: int
    eligible_macs_before: int | None
    eligible_macs_after: int | None
    convs: int
    rewritten: int
    skipped: int
    eligible: int

    @property
    def macs_ratio(self) -> float | None:
        return _ratio(self.macs_after, self.macs_before)

    @property
    def eligible_macs_ratio(self) -> float | None:
        return _ratio(self.eligible_macs_after, self.eligible_macs_before)

    @property
    def params_ratio(self) -> float | None:
        return _ratio(self.params_after, self.params_before)

    def to_dict(self) -> dict:
        return {
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "eligible_macs_before": self.eligible_macs_before,
            "eligible_macs_after": self.eligible_macs_after,
            "eligible_macs_ratio": self.eligible_macs_ratio,
            "convs": self.convs,
            "rewritten": self.rewritten,
            "skipped": self.skipped,
            "eligible": self.eligible,
        }


@dataclass
class Report:
    model: dict[str, Any]
    settings: dict[str, Any]
    layers: list[LayerPlan]
    verification: VerificationResult | None = None
    benchmark: dict[str, Any] | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Optional trade-off sweep: one dict per point, with at least
    # ``eligible_macs_ratio`` and ``estimated_error`` (optionally ``score``, ``rank``, ``label``, ...).
    sweep: list[dict[str, Any]] | None = None

    @property
    def totals(self) -> Totals:
        return compute_totals(self.layers)

    def to_dict(self) -> dict[str, Any]:
        verification = (
            self.verification.to_dict() if self.verification is not None else {"ran": False, "passed": None, "outputs": []}
        )
        data = {
            "schema": SCHEMA,
            "model": self.model,
            "settings": self.settings,
            "totals": self.totals.to_dict(),
            "layers": [_layer_dict(layer) for layer in self.layers],
            "verification": verification,
            "passes": self.passes,
            "notes": self.notes,
        }
        if self.benchmark is not None:
            data["benchmark"] = self.benchmark
        if self.sweep is not None:
            data["sweep"] = self.sweep
        return data

    def data(self) -> dict[str, Any]:
        """The JSON dict exactly as written (NaN/Inf as None): what every file format renders."""
        return _json_safe(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.data(), indent=2, sort_keys=False) + "\n"

    def to_markdown(self) -> str:
        return render_markdown(self)

    def to_html(self) -> str:
        return render_html(self)

    def render(self, fmt: str) -> str:
        """``fmt`` is 'json', 'markdown' or 'html'."""
        renderers = {"json": self.to_json, "markdown": self.to_markdown, "html": self.to_html}
        if fmt not in renderers:
            raise UsageError(f"unknown report format {fmt!r}; use one of {', '.join(renderers)}")
        return renderers[fmt]()

    def write(self, path: str | os.PathLike) -> None:
        """Write the report atomically; the format follows the suffix (.json, .md, .html)."""
        write_report(self, path)


def report_format(path: str | os.PathLike) -> str:
    """The renderer for a report path, from its suffix. Raises UsageError for an unknown suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--report {path}: unknown format; use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def write_report(report: Report, path: str | os.PathLike) -> None:
    """Render ``report`` in the format of ``path``'s suffix and write it via a temp file + rename."""
    from .model_io import atomic_write_text  # noqa: PLC0415 (keeps report importable without onnx I/O)

    atomic_write_text(path, report.render(report_format(path)))


def compute_totals(layers: list[LayerPlan]) -> Totals:
    def total(values):
        values = list(values)
        return None if any(v is None for v in values) else sum(values)

    eligible = [layer for layer in layers if layer.eligible]
    return Totals(
        macs_before=total(layer.macs_before for layer in layers),
        macs_after=total(layer.macs_after for layer in layers),
        params_before=sum(layer.params_before or 0 for layer in layers),
        params_after=sum(layer.params_after or 0 for layer in layers),
        eligible_macs_before=total(layer.macs_before for layer in eligible),
        eligible_macs_after=total(layer.macs_after for layer in eligible),
        convs=len(layers),
        rewritten=sum(1 for layer in layers if layer.rewritten),
        skipped=sum(1 for layer in layers if not layer.rewritten),
        eligible=len(eligible),
    )


def _layer_dict(layer: LayerPlan) -> dict[str, Any]:
    data = layer.to_dict()
    data["macs_ratio"] = _ratio(layer.macs_per_pixel_after, layer.macs_per_pixel_before)
    return data


def _ratio(after, before) -> float | None:
    if after is None or before is None or before == 0:
        return None
    return after / before


def _json_safe(value):
    """NaN and Inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- shared formatting: every view formats numbers with these ---------------------------------


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


_fmt_ratio = fmt_ratio  # the old private name


def fmt_error(value: float | None) -> str:
    """Per-layer weight/output errors: '' when there is none."""
    return "" if value is None or not math.isfinite(value) else f"{value:.3f}"


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
    params, params_before, params_after, weight_error, output_error, latency (per-conv timing, when measured).
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
        "latency": _latency_cell(layer.get("latency_before_ms"), layer.get("latency_after_ms")),
    }


def _latency_cell(before: float | None, after: float | None) -> str:
    if before is None and after is None:
        return ""
    return f"{fmt_ms(before)}→{fmt_ms(after)}" if after is not None and after != before else fmt_ms(before)


def verdict(verification: Mapping[str, Any]) -> str:
    """'passed', 'FAILED' or 'not run'."""
    if not verification.get("ran"):
        return "not run"
    return "passed" if verification.get("passed") else "FAILED"


def tolerance_text(verification: Mapping[str, Any]) -> str:
    atol, rtol = verification.get("atol"), verification.get("rtol")
    if atol is None and rtol is None:
        return "no tolerance set (shapes, dtypes and finiteness only)"
    return f"atol={atol or 0:g}, rtol={rtol or 0:g}"


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


def _sweep_columns(sweep: Sequence[Mapping[str, Any]]) -> list[str]:
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


# -- terminal ---------------------------------------------------------------------------------


def render_terminal(report: Report, console: Console, *, top: int | None = None) -> None:
    """The savings table, totals and verification verdict.

    ``top``: show only the ``top`` layers with the largest MACs before (largest first).
    With more than :data:`COLLAPSE_OVER` rows, rows of identical configuration are
    collapsed into one (MACs and params summed). The report files always have every layer.
    """
    data = report.data()
    layers = data["layers"]
    shown = layers
    if top is not None and top < len(layers):
        order = sorted(range(len(layers)), key=lambda i: (layers[i]["macs_before"] is None, -(layers[i]["macs_before"] or 0), i))
        shown = [layers[i] for i in order[:top]]
    rows = [(layer, 1) for layer in shown]
    if len(rows) > COLLAPSE_OVER:
        rows = _collapse(shown)

    with_output_error = any(layer.get("output_error") is not None for layer in layers)
    table = Table(title=f"dsrewrite: {rich_escape(str(report.model.get('input', '')))}", title_justify="left")
    columns = [
        ("conv", "left"),
        ("in→out", "right"),
        ("kernel", "right"),
        ("g", "right"),
        ("rank / skip reason", "left"),
        ("MACs before→after", "right"),
        ("ratio", "right"),
        ("params before→after", "right"),
        ("weight err", "right"),
    ]
    if with_output_error:
        columns.append(("output err", "right"))
    for column, justify in columns:
        table.add_column(column, justify=justify, overflow="fold")
    for layer, count in rows:
        cells = layer_cells(layer)
        node = cells["node"] if count == 1 else f"{cells['node']} … (×{count})"
        decision = rich_escape(cells["decision"])
        if layer.get("status") != REWRITTEN:
            decision = f"[dim]{decision}[/dim]"
        weight_error = layer.get("_weight_error_text", cells["weight_error"])
        row = [rich_escape(node), cells["channels"], cells["kernel"], cells["group"], decision, cells["macs"],
               cells["ratio"], cells["params"], weight_error]  # fmt: skip
        if with_output_error:
            row.append(layer.get("_output_error_text", cells["output_error"]))
        table.add_row(*row)
    console.print(table)
    if len(shown) < len(layers):
        console.print(
            f"Showing the {len(shown)} convs with the most MACs; {len(layers) - len(shown)} more hidden "
            f"(the report files list all {len(layers)})."
        )
    if len(rows) < len(shown):
        console.print(
            f"{len(shown)} convs in {len(rows)} rows: convs of identical configuration are collapsed into one "
            "row (×count) with MACs and params summed (the report files list every conv)."
        )

    totals = report.totals
    if totals.convs == 0:
        console.print("Nothing to rewrite: the model has no Conv nodes.")
    else:
        console.print(
            f"Convs: {totals.rewritten} rewritten, {totals.skipped} skipped of {totals.convs} "
            f"({totals.eligible} eligible)."
        )
        console.print(
            f"Conv MACs: {human(totals.macs_before)} → {human(totals.macs_after)} "
            f"({fmt_ratio(totals.macs_ratio)}); eligible convs: {human(totals.eligible_macs_before)} → "
            f"{human(totals.eligible_macs_after)} ({fmt_ratio(totals.eligible_macs_ratio)}). "
            f"Conv params: {human(totals.params_before)} → {human(totals.params_after)}."
        )
    bench = benchmark_figures(report.benchmark)
    if bench is not None and (bench["before_ms"] is not None or bench["after_ms"] is not None):
        predicted = (report.benchmark or {}).get("predicted_speedup")
        share = (report.benchmark or {}).get("conv_time_share")
        expected = (
            f"; MAC-predicted {fmt_speedup(predicted)} (Amdahl, convs {share:.0%} of run time)"
            if predicted is not None and share is not None
            else ""
        )
        console.print(
            f"Latency in onnxruntime: {fmt_ms(bench['before_ms'])} → {fmt_ms(bench['after_ms'])} "
            f"(measured speedup {fmt_speedup(bench['speedup'])}{expected})."
        )
    if report.passes:
        steps = ", ".join(f"{p['name']} ({p['changes']} changes, {p['seconds']:.2f}s)" for p in report.passes)
        console.print(f"Passes: {steps}.")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {rich_escape(note)}")
    render_verification(report.verification, console)


def _collapse(layers: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """Group layers of identical configuration (in→out, kernel, group, decision), first-seen order.

    Each group becomes one layer dict: the first layer's name, summed MACs/params, the per-pixel
    ratio of the sums, and the range of weight/output errors.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for layer in layers:
        cells = layer_cells(layer)
        key = (cells["channels"], cells["kernel"], cells["group"], cells["decision"])
        groups.setdefault(key, []).append(layer)
    rows = []
    for members in groups.values():
        if len(members) == 1:
            rows.append((members[0], 1))
            continue
        merged = dict(members[0])
        for key in ("macs_before", "macs_after", "params_before", "params_after",
                    "macs_per_pixel_before", "macs_per_pixel_after"):  # fmt: skip
            values = [m.get(key) for m in members]
            merged[key] = None if any(v is None for v in values) else sum(values)
        merged["macs_ratio"] = _ratio(merged["macs_per_pixel_after"], merged["macs_per_pixel_before"])
        for key in ("weight_error", "output_error"):
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                low, high = fmt_error(min(values)), fmt_error(max(values))
                merged[f"_{key}_text"] = low if low == high else f"{low}–{high}"
        rows.append((merged, len(members)))
    return rows


def render_verification(verification: VerificationResult | None, console: Console) -> None:
    if verification is None or not verification.ran:
        console.print("Verification: not run.")
        return
    if verification.atol is None and verification.rtol is None:
        tolerance = "no tolerance set (shapes, dtypes and finiteness only)"
    else:
        tolerance = f"atol={verification.atol or 0:g}, rtol={verification.rtol or 0:g}"
    verdict_text = "[green]PASSED[/green]" if verification.passed else "[red]FAILED[/red]"
    console.print(
        f"Verification in onnxruntime: {verdict_text} on {verification.samples} {rich_escape(verification.inputs)} "
        f"sample(s); {tolerance}."
    )
    for out in verification.outputs:
        console.print(
            f"  {rich_escape(out.name)}: max_abs={out.max_abs:.3g} mean_abs={out.mean_abs:.3g} max_rel={out.max_rel:.3g} "
            f"cosine={out.cosine:.6f}; would pass with atol>={out.min_atol:.3g} or rtol>={out.min_rtol:.3g}"
        )
    for problem in verification.problems:
        console.print(f"  [red]{rich_escape(problem)}[/red]")


# -- Markdown ---------------------------------------------------------------------------------

_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|#"})


def md_text(text: Any) -> str:
    """Plain text for a Markdown table cell or list item: specials and pipes escaped, one line."""
    return " ".join(str(text).split()).translate(_MD_SPECIAL)


def md_code(text: Any) -> str:
    """Text as an inline code span that is safe inside a table cell (pipes escaped)."""
    text = " ".join(str(text).split())
    longest = max((len(run) for run in _backtick_runs(text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def _backtick_runs(text: str) -> list[str]:
    runs, current = [], ""
    for char in text:
        if char == "`":
            current += char
        elif current:
            runs.append(current)
            current = ""
    if current:
        runs.append(current)
    return runs


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join({"l": ":---", "r": "---:"}[a] for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(report: Report) -> str:
    """A summary fit for a pull-request comment: totals, verification, notes, every layer."""
    data = report.data()
    totals, verification, layers = data["totals"], data["verification"], data["layers"]
    lines = [f"## dsrewrite: {md_code(model_title(data['model']))}", ""]
    source = f"Input {md_code(data['model'].get('input'))}"
    if data["model"].get("output"):
        source += f" → output {md_code(data['model']['output'])}"
    settings = settings_text(data["settings"])
    lines += [source + (f"; settings: {md_text(settings)}" if settings else "") + ".", ""]

    rows = [
        ("Conv MACs", human(totals["macs_before"]), human(totals["macs_after"]), fmt_ratio(totals["macs_ratio"])),
        ("Eligible conv MACs", human(totals["eligible_macs_before"]), human(totals["eligible_macs_after"]),
         fmt_ratio(totals["eligible_macs_ratio"])),
        ("Conv params", human(totals["params_before"]), human(totals["params_after"]), fmt_ratio(totals["params_ratio"])),
    ]  # fmt: skip
    bench = benchmark_figures(data.get("benchmark"))
    if bench is not None:
        rows.append(("Latency", fmt_ms(bench["before_ms"]), fmt_ms(bench["after_ms"]),
                     f"speedup {fmt_speedup(bench['speedup'])}"))  # fmt: skip
    lines += _md_table(["", "before", "after", "after / before"], rows, "lrrr")
    lines += [
        "",
        f"**Convs:** {totals['rewritten']} rewritten, {totals['skipped']} skipped of {totals['convs']} "
        f"({totals['eligible']} eligible).",
        "",
    ]
    if bench is not None and bench["extras"]:
        extras = ", ".join(f"{md_text(k)}={md_text(fmt_value(v))}" for k, v in bench["extras"].items())
        lines += [f"**Benchmark:** {extras}.", ""]

    verdict_text = verdict(verification)
    line = f"**Verification in onnxruntime: {verdict_text}**"
    if verification.get("ran"):
        line += (
            f" on {verification.get('samples')} {md_text(verification.get('inputs', ''))} sample(s); "
            f"{md_text(tolerance_text(verification))}."
        )
    lines += [line, ""]
    if verification.get("outputs"):
        keys = ["name", "shape", "max_abs", "mean_abs", "max_rel", "cosine", "min_atol", "min_rtol", "passed"]
        header = ["output", "shape", "max_abs", "mean_abs", "max_rel", "cosine", "passes at atol ≥", "or rtol ≥", "passed"]
        out_rows = []
        for output in verification["outputs"]:
            cells = output_cells(output)
            out_rows.append([md_code(cells["name"])] + [md_text(cells[k]) for k in keys[1:]])
        lines += _md_table(header, out_rows, "llrrrrrrl") + [""]
    for problem in verification.get("problems") or []:
        lines.append(f"- :x: {md_text(problem)}")
    if verification.get("problems"):
        lines.append("")

    if data["notes"]:
        lines += ["### Notes", ""] + [f"- {md_text(note)}" for note in data["notes"]] + [""]

    if data.get("sweep"):
        columns = _sweep_columns(data["sweep"])
        lines += ["### Trade-off sweep", ""]
        lines += _md_table(
            [md_text(c) for c in columns],
            ([md_text(sweep_cell(c, point.get(c))) for c in columns] for point in data["sweep"]),
            ["r"] * len(columns),
        )
        lines.append("")

    lines += [f"### Layers ({len(layers)})", ""]
    if layers:
        with_output_error = any(layer.get("output_error") is not None for layer in layers)
        with_latency = any(layer.get("latency_before_ms") is not None for layer in layers)
        many = len(layers) > COLLAPSE_OVER
        if many:
            lines += [f"<details><summary>All {len(layers)} convs</summary>", ""]
        header = ["#", "conv", "in→out", "kernel", "g", "rank / skip reason", "MACs before→after", "ratio",
                  "params before→after", "weight err"]  # fmt: skip
        if with_output_error:
            header.append("output err")
        if with_latency:
            header.append("conv latency")
        layer_rows = []
        for index, layer in enumerate(layers, 1):
            cells = layer_cells(layer)
            row = [str(index), md_code(cells["node"])] + [
                md_text(cells[k])
                for k in ("channels", "kernel", "group", "decision", "macs", "ratio", "params", "weight_error")
            ]
            if with_output_error:
                row.append(md_text(cells["output_error"]))
            if with_latency:
                row.append(md_text(cells["latency"]))
            layer_rows.append(row)
        lines += _md_table(header, layer_rows, "rlrrrlrrrr" + "r" * (len(header) - 10))
        if many:
            lines += ["", "</details>"]
    else:
        lines.append("Nothing to rewrite: the model has no Conv nodes.")
    lines += ["", f"<sub>dsrewrite {md_text(data['model'].get('dsrewrite_version', ''))}, {SCHEMA}</sub>", ""]
    return "\n".join(lines)


# -- HTML -------------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1f2933; --muted: #616e7c; --line: #e4e7eb; --bg: #ffffff; --panel: #f7f9fb;
  --before: #c9d6e3; --after: #1f9d8b; --skipped: #9aa5b1; --good: #1b7f4c; --bad: #c0392b; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; font-weight: 650; }
h2 { font-size: 17px; margin: 32px 0 10px; font-weight: 650; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92em; }
.meta { color: var(--muted); margin: 0 0 20px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(205px, 1fr)); gap: 12px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 17px; font-weight: 600; margin: 2px 0; font-variant-numeric: tabular-nums; white-space: nowrap; }
.card .sub { color: var(--muted); font-size: 13px; }
.badge { display: inline-block; padding: 1px 10px; border-radius: 999px; font-weight: 600; font-size: 13px; }
.badge.pass { background: #e3f5eb; color: var(--good); }
.badge.fail { background: #fbe7e5; color: var(--bad); }
.badge.none { background: #eceff3; color: var(--muted); }
ul.notes { padding-left: 20px; margin: 0; }
ul.notes li { margin: 2px 0; }
.problems li { color: var(--bad); }
.tablewrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 10px; }
.tablewrap.compact { display: inline-block; max-width: 100%; }
.gap { height: 12px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 8px; text-align: left; border-bottom: 1px solid var(--line); white-space: nowrap; }
td.decision { white-space: normal; min-width: 120px; max-width: 230px; }
th { background: var(--panel); font-weight: 600; font-size: 13px; position: sticky; top: 0; white-space: normal;
  vertical-align: bottom; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) { background: #fbfcfd; }
tbody tr:hover { background: #eef6f5; }
tr.skipped td.decision { color: var(--muted); }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: "\\00a0\\2195"; color: #b0b8c1; font-size: 11px; }
table.sortable th[aria-sort="ascending"]::after { content: "\\00a0\\2191"; color: var(--fg); }
table.sortable th[aria-sort="descending"]::after { content: "\\00a0\\2193"; color: var(--fg); }
td.node { max-width: 260px; overflow: hidden; text-overflow: ellipsis; }
.chart { border: 1px solid var(--line); border-radius: 10px; padding: 10px; background: #fff; }
.chart svg { display: block; width: 100%; height: auto; }
.hint { color: var(--muted); font-size: 13px; margin: 4px 0 8px; }
footer { color: var(--muted); font-size: 12px; margin-top: 36px; }
"""

_JS = """
(function () {
  function key(cell) {
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    var num = raw === "" ? NaN : Number(raw);
    return { empty: raw === "", num: isNaN(num) ? null : num, text: raw };
  }
  function compare(a, b) {
    if (a.num !== null && b.num !== null) return a.num - b.num;
    if (a.num !== null) return -1;
    if (b.num !== null) return 1;
    return a.text.localeCompare(b.text, undefined, { numeric: true, sensitivity: "base" });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      function sort() {
        var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir);
        var sign = dir === "ascending" ? 1 : -1;
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var a = key(r1.cells[col]), b = key(r2.cells[col]);
          if (a.empty !== b.empty) return a.empty ? 1 : -1;
          return sign * compare(a, b) || (Number(r1.dataset.index) - Number(r2.dataset.index));
        });
        rows.forEach(function (row) { body.appendChild(row); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  });
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _sort_value(value: Any) -> str:
    """The exact JSON value for ``data-sort`` ('' for null)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _td(text: str, *, col: str, sort: Any = None, numeric: bool = False, title: str | None = None,
        extra_class: str = "") -> str:  # fmt: skip
    classes = " ".join(c for c in ("num" if numeric else "", extra_class) if c)
    attrs = f' data-col="{_e(col)}"'
    if classes:
        attrs += f' class="{classes}"'
    if sort is not None:
        attrs += f' data-sort="{_e(sort)}"'
    if title:
        attrs += f' title="{_e(title)}"'
    return f"<td{attrs}>{_e(text)}</td>"


def _exact(n: Any) -> str | None:
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else None


def _card(label: str, value: str, sub: str = "", *, value_html: str | None = None) -> str:
    sub_html = f'<div class="sub">{_e(sub)}</div>' if sub else ""
    return (
        f'<div class="card"><div class="label">{_e(label)}</div>'
        f'<div class="value">{value_html if value_html is not None else _e(value)}</div>{sub_html}</div>'
    )


def _saving(ratio: float | None) -> str:
    if ratio is None:
        return ""
    return f"ratio {fmt_ratio(ratio)} · {(1 - ratio) * 100:.1f}% fewer" if ratio <= 1 else f"ratio {fmt_ratio(ratio)}"


def render_html(report: Report) -> str:
    """One self-contained page: inline CSS, inline SVG charts, inline vanilla JS; loads nothing."""
    data = report.data()
    totals, verification, layers = data["totals"], data["verification"], data["layers"]
    title = model_title(data["model"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>dsrewrite: {_e(title)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>dsrewrite report: <code>{_e(title)}</code></h1>",
    ]
    meta = f"Input <code>{_e(data['model'].get('input'))}</code>"
    if data["model"].get("output"):
        meta += f" → output <code>{_e(data['model']['output'])}</code>"
    if data["model"].get("opset") is not None:
        meta += f" · opset {_e(data['model']['opset'])}"
    settings = settings_text(data["settings"])
    if settings:
        meta += f"<br>Settings: {_e(settings)}"
    parts.append(f'<p class="meta">{meta}</p>')

    # Summary cards
    cards = [
        _card("Conv MACs", f"{human(totals['macs_before'])} → {human(totals['macs_after'])}", _saving(totals["macs_ratio"])),
        _card("Eligible conv MACs", f"{human(totals['eligible_macs_before'])} → {human(totals['eligible_macs_after'])}",
              _saving(totals["eligible_macs_ratio"])),
        _card("Conv params", f"{human(totals['params_before'])} → {human(totals['params_after'])}",
              _saving(totals["params_ratio"])),
        _card("Convs rewritten", f"{totals['rewritten']} of {totals['convs']}",
              f"{totals['skipped']} skipped · {totals['eligible']} eligible"),
    ]  # fmt: skip
    bench = benchmark_figures(data.get("benchmark"))
    if bench is not None:
        cards.append(_card("Latency", f"{fmt_ms(bench['before_ms'])} → {fmt_ms(bench['after_ms'])}",
                           f"speedup {fmt_speedup(bench['speedup'])}"))  # fmt: skip
    verdict_text = verdict(verification)
    badge_class = {"passed": "pass", "FAILED": "fail"}.get(verdict_text, "none")
    cards.append(
        _card("Verification", verdict_text, tolerance_text(verification) if verification.get("ran") else "",
              value_html=f'<span class="badge {badge_class}">{_e(verdict_text)}</span>')  # fmt: skip
    )
    parts.append('<section class="cards" id="summary">' + "".join(cards) + "</section>")
    if bench is not None and bench["extras"]:
        extras = ", ".join(f"{k}={fmt_value(v)}" for k, v in bench["extras"].items())
        parts.append(f'<p class="hint">Benchmark: {_e(extras)}</p>')

    if data["notes"]:
        parts.append('<h2>Notes</h2><ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in data["notes"]) + "</ul>")

    # Verification
    parts.append('<h2 id="verification">Verification</h2>')
    if verification.get("ran"):
        parts.append(
            f"<p>onnxruntime: <span class=\"badge {badge_class}\">{_e(verdict_text)}</span> on "
            f"{_e(verification.get('samples'))} {_e(verification.get('inputs', ''))} sample(s); "
            f"{_e(tolerance_text(verification))}.</p>"
        )
    else:
        parts.append("<p>Not run.</p>")
    if verification.get("outputs"):
        header = [("output", False), ("shape", False), ("max_abs", True), ("mean_abs", True), ("max_rel", True),
                  ("cosine", True), ("passes at atol ≥", True), ("or rtol ≥", True), ("passed", False)]  # fmt: skip
        keys = ["name", "shape", "max_abs", "mean_abs", "max_rel", "cosine", "min_atol", "min_rtol", "passed"]
        rows = []
        for index, output in enumerate(verification["outputs"]):
            cells = output_cells(output)
            tds = "".join(
                _td(cells[k], col=k, numeric=num, sort=_sort_value(output.get(k)) if num else None)
                for k, (_, num) in zip(keys, header)
            )
            rows.append(f'<tr data-index="{index}">{tds}</tr>')
        parts.append(_html_table(header, rows, table_id="outputs"))
    if verification.get("problems"):
        parts.append('<ul class="notes problems">' + "".join(f"<li>{_e(p)}</li>" for p in verification["problems"]) + "</ul>")

    # Chart
    parts.append('<h2 id="chart">MACs per conv</h2>')
    if layers:
        parts.append(f'<div class="chart">{macs_chart_svg(layers)}</div>')
    else:
        parts.append("<p>Nothing to rewrite: the model has no Conv nodes.</p>")

    # Layers
    parts.append(f'<h2 id="layers">Layers ({len(layers)})</h2>')
    if layers:
        parts.append('<p class="hint">Click a column header to sort.</p>')
        parts.append(layers_table_html(layers))
    if data["passes"]:
        steps = ", ".join(f"{p['name']} ({p['changes']} changes, {p['seconds']:.2f}s)" for p in data["passes"])
        parts.append(f'<p class="hint">Passes: {_e(steps)}.</p>')

    # Sweep
    if data.get("sweep"):
        parts.append('<h2 id="sweep">Trade-off: MACs against estimated error</h2>')
        parts.append(f'<div class="chart">{sweep_chart_svg(data["sweep"], current=totals["eligible_macs_ratio"])}</div>')
        columns = _sweep_columns(data["sweep"])
        header = [(c, True) for c in columns]
        rows = []
        for index, point in enumerate(data["sweep"]):
            tds = "".join(
                _td(sweep_cell(c, point.get(c)), col=c, numeric=True,
                    sort=_sort_value(point.get(c)) if isinstance(point.get(c), (int, float)) else None)
                for c in columns
            )  # fmt: skip
            rows.append(f'<tr data-index="{index}">{tds}</tr>')
        parts.append('<div class="gap"></div>' + _html_table(header, rows, table_id="sweep-table", compact=True))

    parts.append(f"<footer>dsrewrite {_e(data['model'].get('dsrewrite_version', ''))} · {_e(SCHEMA)}</footer>")
    parts.append(f"</main><script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


NUM_CLASS = ' class="num"'


def _html_table(header: Sequence[tuple[str, bool]], rows: Sequence[str], *, table_id: str, compact: bool = False) -> str:
    ths = "".join(f'<th scope="col"{NUM_CLASS if num else ""}>{_e(label)}</th>' for label, num in header)
    wrap = "tablewrap compact" if compact else "tablewrap"
    return (
        f'<div class="{wrap}"><table class="sortable" id="{_e(table_id)}"><thead><tr>{ths}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def layers_table_html(layers: Sequence[Mapping[str, Any]]) -> str:
    with_output_error = any(layer.get("output_error") is not None for layer in layers)
    header = [("#", True), ("conv", False), ("in→out", True), ("kernel", True), ("g", True),
              ("rank / skip reason", False), ("MACs before", True), ("MACs after", True), ("ratio", True),
              ("params before", True), ("params after", True), ("weight err", True)]  # fmt: skip
    if with_output_error:
        header.append(("output err", True))
    with_latency = any(layer.get("latency_before_ms") is not None for layer in layers)
    if with_latency:
        header += [("conv ms before", True), ("conv ms after", True)]
    rows = []
    for index, layer in enumerate(layers):
        cells = layer_cells(layer)
        rewritten = layer.get("status") == REWRITTEN
        tds = [
            _td(str(index + 1), col="index", sort=index, numeric=True),
            _td(cells["node"], col="node", title=cells["node"], extra_class="node"),
            _td(cells["channels"], col="channels", numeric=True),
            _td(cells["kernel"], col="kernel", numeric=True),
            _td(cells["group"], col="group", sort=_sort_value(layer.get("group")), numeric=True),
            _td(cells["decision"], col="decision", sort=layer.get("rank") if rewritten else cells["decision"],
                extra_class="decision"),
            _td(cells["macs_before"], col="macs_before", sort=_sort_value(layer.get("macs_before")), numeric=True,
                title=_exact(layer.get("macs_before"))),
            _td(cells["macs_after"], col="macs_after", sort=_sort_value(layer.get("macs_after")), numeric=True,
                title=_exact(layer.get("macs_after"))),
            _td(cells["ratio"], col="ratio", sort=_sort_value(layer.get("macs_ratio")) if rewritten else "",
                numeric=True),
            _td(cells["params_before"], col="params_before", sort=_sort_value(layer.get("params_before")),
                numeric=True, title=_exact(layer.get("params_before"))),
            _td(cells["params_after"], col="params_after", sort=_sort_value(layer.get("params_after")),
                numeric=True, title=_exact(layer.get("params_after"))),
            _td(cells["weight_error"], col="weight_error",
                sort=_sort_value(layer.get("weight_error")) if rewritten else "", numeric=True),
        ]  # fmt: skip
        if with_output_error:
            tds.append(_td(cells["output_error"], col="output_error",
                           sort=_sort_value(layer.get("output_error")) if rewritten else "", numeric=True))  # fmt: skip
        if with_latency:
            for key in ("latency_before_ms", "latency_after_ms"):
                value = layer.get(key)
                tds.append(_td("" if value is None else f"{value:.3g}", col=key, sort=_sort_value(value), numeric=True))
        status = "rewritten" if rewritten else "skipped"
        rows.append(f'<tr class="{status}" data-index="{index}">{"".join(tds)}</tr>')
    return _html_table(header, rows, table_id="layers-table")


# -- inline SVG charts ------------------------------------------------------------------------


def _nice_ticks(vmax: float, count: int = 5) -> list[float]:
    """0, step, 2·step, ... covering vmax, with step 1/2/2.5/5·10^k."""
    if not vmax or vmax <= 0 or not math.isfinite(vmax):
        return [0.0, 1.0]
    raw = vmax / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = magnitude * 10
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * magnitude * (1 + 1e-12):
            step = m * magnitude
            break
    n = max(1, math.ceil(vmax / step - 1e-9))
    return [i * step for i in range(n + 1)]


def _tick_label(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def macs_chart_svg(layers: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars per conv: MACs before (wide, light) with MACs after overlaid (narrow, dark).

    Unknown MACs (None) get an 'unknown' label instead of a bar; when every conv's MACs are unknown the
    chart falls back to MACs per output pixel and says so. Row height shrinks for many convs (1..300+).
    """
    n = len(layers)
    before_key, after_key, unit = "macs_before", "macs_after", "MACs"
    if all(layer.get("macs_before") is None for layer in layers) and any(
        layer.get("macs_per_pixel_before") is not None for layer in layers
    ):
        before_key, after_key, unit = "macs_per_pixel_before", "macs_per_pixel_after", "MACs per output pixel"
    values = [v for layer in layers for v in (layer.get(before_key), layer.get(after_key)) if v is not None]
    ticks = _nice_ticks(max(values, default=0))
    vmax = ticks[-1]
    row = 24 if n <= COLLAPSE_OVER else max(5, min(24, 1200 // n))
    label_w, bar_w, value_w = 200, 560, 150
    width = label_w + bar_w + value_w
    top, bottom = 52, 12
    height = top + n * row + bottom
    font = min(12, row - 3)
    show_labels = row >= 12
    unknown_rows = any(layer.get(before_key) is None and layer.get(after_key) is None for layer in layers)

    def x(value: float) -> float:
        return label_w + bar_w * (value / vmax if vmax else 0)

    out = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_e(unit)} per conv, before and after" '
        f'font-family="system-ui, -apple-system, Segoe UI, Roboto, Arial, sans-serif" font-size="12">'
    ]
    # legend
    out.append(
        '<g transform="translate(0,8)">'
        f'<rect x="{label_w}" y="0" width="14" height="12" rx="2" fill="#c9d6e3"/>'
        f'<text x="{label_w + 20}" y="10" fill="#1f2933">before</text>'
        f'<rect x="{label_w + 80}" y="3" width="14" height="6" rx="1" fill="#1f9d8b"/>'
        f'<text x="{label_w + 100}" y="10" fill="#1f2933">after (rewritten)</text>'
        f'<rect x="{label_w + 220}" y="3" width="14" height="6" rx="1" fill="#9aa5b1"/>'
        f'<text x="{label_w + 240}" y="10" fill="#1f2933">skipped (unchanged)</text>'
        + (
            f'<line x1="{label_w + 385}" y1="6" x2="{label_w + 399}" y2="6" stroke="#9aa5b1" stroke-width="3" '
            f'stroke-dasharray="3 3"/><text x="{label_w + 405}" y="10" fill="#1f2933">unknown</text>'
            if unknown_rows and not show_labels
            else ""
        )
        + f'<text x="{width - 4}" y="10" text-anchor="end" fill="#616e7c">{_e(unit)}</text>'
        "</g>"
    )
    # grid + tick labels
    for tick in ticks:
        tx = x(tick)
        out.append(
            f'<line x1="{tx:.1f}" y1="{top - 6}" x2="{tx:.1f}" y2="{top + n * row}" stroke="#e4e7eb" stroke-width="1"/>'
            f'<text x="{tx:.1f}" y="{top - 10}" text-anchor="middle" fill="#616e7c" font-size="11">{_e(_tick_label(tick))}</text>'
        )
    for i, layer in enumerate(layers):
        y = top + i * row
        cells = layer_cells(layer)
        before, after = layer.get(before_key), layer.get(after_key)
        rewritten = layer.get("status") == REWRITTEN
        tip = f"{cells['node']}: {human(before)} → {human(after)} {unit}; {cells['decision']}"
        out.append(f"<g><title>{_e(tip)}</title>")
        out.append(f'<rect x="0" y="{y}" width="{width}" height="{row}" fill="#ffffff" fill-opacity="0"/>')
        if show_labels:
            out.append(
                f'<text x="{label_w - 8}" y="{y + row / 2:.1f}" dy="0.35em" text-anchor="end" fill="#1f2933" '
                f'font-size="{font}">{_e(_truncate(cells["node"], 28))}</text>'
            )
        if before is None and after is None:
            if show_labels:
                out.append(
                    f'<text x="{label_w + 4}" y="{y + row / 2:.1f}" dy="0.35em" fill="#9aa5b1" font-style="italic" '
                    f'font-size="{font}">MACs unknown</text></g>'
                )
            else:
                out.append(
                    f'<line x1="{label_w}" y1="{y + row / 2:.1f}" x2="{label_w + 40}" y2="{y + row / 2:.1f}" '
                    f'stroke="#9aa5b1" stroke-width="{max(row / 3, 1):.1f}" stroke-dasharray="3 3"/></g>'
                )
            continue
        gap = 1 if row < 10 else 3
        if before is not None:
            out.append(
                f'<rect x="{label_w}" y="{y + gap / 2:.1f}" width="{max(x(before) - label_w, 0.5):.1f}" '
                f'height="{row - gap:.1f}" rx="{2 if row >= 10 else 0}" fill="#c9d6e3"/>'
            )
        if after is not None:
            inner = max((row - gap) * 0.45, 1)
            out.append(
                f'<rect x="{label_w}" y="{y + (row - inner) / 2:.1f}" width="{max(x(after) - label_w, 0.5):.1f}" '
                f'height="{inner:.1f}" rx="{1 if row >= 10 else 0}" fill="{"#1f9d8b" if rewritten else "#9aa5b1"}"/>'
            )
        if show_labels:
            end = max(x(v) for v in (before, after) if v is not None)
            text = f"{human(before)} → {human(after)}" if rewritten else human(before)
            if before is None or after is None:
                text += " (partly unknown)"
            out.append(
                f'<text x="{end + 6:.1f}" y="{y + row / 2:.1f}" dy="0.35em" fill="#616e7c" font-size="{font}">'
                f"{_e(text)}</text>"
            )
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


# Sweep point keys that label a point in the chart, with their prefixes.
_SWEEP_LABELS = (("label", ""), ("target", "target "), ("rank", "rank "), ("max_error", "max_error "))


def _scalar(value: Any) -> bool:
    return value is not None and not isinstance(value, (dict, list, tuple))


def sweep_chart_svg(sweep: Sequence[Mapping[str, Any]], *, current: float | None = None) -> str:
    """Scatter + line: eligible MACs ratio (x) against estimated error (y), one point per sweep entry.

    ``current``: this report's own eligible MACs ratio, drawn as a dashed vertical line.
    """

    def number(value):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None

    points = []
    for point in sweep:
        px, py = number(point.get("eligible_macs_ratio")), number(point.get("estimated_error"))
        if px is not None and py is not None:
            points.append((px, py, point))
    width, height = 760, 380
    left, right, top, bottom = 64, 24, 20, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    if current is not None and not (isinstance(current, (int, float)) and math.isfinite(current)):
        current = None
    xticks = _nice_ticks(max([p[0] for p in points] + [1.0] + ([current] if current is not None else [])), 5)
    yticks = _nice_ticks(max([p[1] for p in points], default=0) or 1.0, 5)
    xmax, ymax = xticks[-1], yticks[-1]

    def sx(v):
        return left + plot_w * v / xmax

    def sy(v):
        return top + plot_h * (1 - v / ymax)

    out = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="trade-off: eligible MACs ratio against '
        f'estimated error" font-family="system-ui, -apple-system, Segoe UI, Roboto, Arial, sans-serif" font-size="12">'
    ]
    for tick in xticks:
        out.append(
            f'<line x1="{sx(tick):.1f}" y1="{top}" x2="{sx(tick):.1f}" y2="{top + plot_h}" stroke="#e4e7eb"/>'
            f'<text x="{sx(tick):.1f}" y="{top + plot_h + 18}" text-anchor="middle" fill="#616e7c" font-size="11">'
            f"{tick:g}</text>"
        )
    for tick in yticks:
        out.append(
            f'<line x1="{left}" y1="{sy(tick):.1f}" x2="{left + plot_w}" y2="{sy(tick):.1f}" stroke="#e4e7eb"/>'
            f'<text x="{left - 8}" y="{sy(tick):.1f}" dy="0.35em" text-anchor="end" fill="#616e7c" font-size="11">'
            f"{tick:.3g}</text>"
        )
    out.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#c5ccd3"/>'
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" text-anchor="middle" fill="#1f2933">'
        "eligible MACs ratio (after / before)</text>"
        f'<text transform="translate(16,{top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" fill="#1f2933">'
        "estimated error</text>"
    )
    if not points:
        out.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" text-anchor="middle" fill="#9aa5b1">'
            "no sweep point has both a MACs ratio and an error</text></svg>"
        )
        return "".join(out)
    if current is not None:
        cx = sx(current)
        out.append(
            f'<line x1="{cx:.1f}" y1="{top}" x2="{cx:.1f}" y2="{top + plot_h}" stroke="#c2410c" stroke-width="1.5" '
            'stroke-dasharray="5 4"/>'
            f'<text x="{cx + 6:.1f}" y="{top + 14}" fill="#c2410c" font-size="11">this report: {_e(fmt_ratio(current))}</text>'
        )
    ordered = sorted(points, key=lambda p: (p[0], p[1]))
    path = " ".join(f"{sx(px):.1f},{sy(py):.1f}" for px, py, _ in ordered)
    out.append(f'<polyline points="{path}" fill="none" stroke="#1f9d8b" stroke-width="2" stroke-linejoin="round"/>')
    labelled: list[tuple[float, float]] = []  # label anchors already drawn, to avoid overlaps
    for px, py, point in ordered:
        tip = "; ".join(f"{k}={sweep_cell(k, v)}" for k, v in point.items() if _scalar(v))
        cx, cy = sx(px), sy(py)
        out.append(
            f'<g><title>{_e(tip)}</title><circle cx="{cx:.1f}" cy="{cy:.1f}" r="4.5" fill="#ffffff" '
            'stroke="#1f9d8b" stroke-width="2"/>'
        )
        label = next((f"{prefix}{fmt_value(point[k])}" for k, prefix in _SWEEP_LABELS if _scalar(point.get(k))), None)
        if label is not None and all(abs(cx - lx) > 70 or abs(cy - ly) > 16 for lx, ly in labelled):
            labelled.append((cx, cy))
            anchor, dx = ("end", -7) if cx > left + plot_w - 80 else ("start", 7)
            out.append(
                f'<text x="{cx + dx:.1f}" y="{cy - 8:.1f}" text-anchor="{anchor}" fill="#1f2933" font-size="11">'
                f"{_e(label)}</text>"
            )
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)
