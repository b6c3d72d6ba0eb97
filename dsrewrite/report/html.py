"""The report as one self-contained HTML page: summary cards, sortable tables, inline SVG charts.

The page loads nothing: the stylesheet and the table-sorting script (``assets/``) and the charts
(``charts``) are inlined. Every cell's text comes from ``text``; ``data-sort`` holds the exact value.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..plan import REWRITTEN
from .charts import macs_chart_svg, sweep_chart_svg
from .text import (
    NO_CONVS,
    benchmark_figures,
    comparisons_text,
    fmt_ms,
    fmt_ratio,
    fmt_speedup,
    fmt_value,
    human,
    layer_cells,
    model_title,
    output_cells,
    passes_text,
    settings_text,
    sweep_cell,
    sweep_columns,
    tolerance_text,
    verdict,
    verification_scope,
)
from .text import escape_html as _e

if TYPE_CHECKING:
    from .model import Report


def render_html(report: Report) -> str:
    """One self-contained page: inline CSS, inline SVG charts, inline vanilla JS; loads nothing."""
    data = report.data()
    title = model_title(data["model"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>dsrewrite: {_e(title)}</title>",
        f"<style>\n{_asset('report.css')}</style></head><body><main>",
        f"<h1>dsrewrite report: <code>{_e(title)}</code></h1>",
        f'<p class="meta">{_meta(data)}</p>',
    ]
    parts += _summary(data)
    if data["notes"]:
        parts.append('<h2>Notes</h2><ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in data["notes"]) + "</ul>")
    parts += _verification(data["verification"])
    parts += _layers(data)
    if data.get("sweep"):
        parts += _sweep(data["sweep"], current=data["totals"]["eligible_macs_ratio"])
    parts.append(f"<footer>dsrewrite {_e(data['model'].get('dsrewrite_version', ''))} · {_e(data['schema'])}</footer>")
    parts.append(f"</main><script>\n{_asset('report.js')}</script></body></html>")
    return "\n".join(parts) + "\n"


@functools.cache
def _asset(name: str) -> str:
    """A file of ``assets/`` (package data), read once."""
    return (resources.files(__package__) / "assets" / name).read_text(encoding="utf-8")


def _meta(data: Mapping[str, Any]) -> str:
    meta = f"Input <code>{_e(data['model'].get('input'))}</code>"
    if data["model"].get("output"):
        meta += f" → output <code>{_e(data['model']['output'])}</code>"
    if data["model"].get("opset") is not None:
        meta += f" · opset {_e(data['model']['opset'])}"
    settings = settings_text(data["settings"])
    if settings:
        meta += f"<br>Settings: {_e(settings)}"
    return meta


def _summary(data: Mapping[str, Any]) -> list[str]:
    """The cards: MACs, eligible MACs, params, convs rewritten, latency when benchmarked, the verdict."""
    totals, verification = data["totals"], data["verification"]
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
        more = comparisons_text(data.get("benchmark"))
        cards.append(_card("Latency", f"{fmt_ms(bench['before_ms'])} → {fmt_ms(bench['after_ms'])}",
                           f"speedup {fmt_speedup(bench['speedup'])}" + (f"; {more}" if more else "")))  # fmt: skip
    cards.append(
        _card("Verification", verdict(verification), tolerance_text(verification) if verification.get("ran") else "",
              value_html=_badge(verification))  # fmt: skip
    )
    parts = ['<section class="cards" id="summary">' + "".join(cards) + "</section>"]
    if bench is not None and bench["extras"]:
        extras = ", ".join(f"{k}={fmt_value(v)}" for k, v in bench["extras"].items())
        parts.append(f'<p class="hint">Benchmark: {_e(extras)}</p>')
    return parts


def _badge(verification: Mapping[str, Any]) -> str:
    verdict_text = verdict(verification)
    badge_class = {"passed": "pass", "FAILED": "fail"}.get(verdict_text, "none")
    return f'<span class="badge {badge_class}">{_e(verdict_text)}</span>'


def _verification(verification: Mapping[str, Any]) -> list[str]:
    """The verdict sentence, the per-output statistics table and the problems found."""
    parts = ['<h2 id="verification">Verification</h2>']
    if verification.get("ran"):
        parts.append(f"<p>onnxruntime: {_badge(verification)} on {verification_scope(verification, _e)}.</p>")
    else:
        parts.append("<p>Not run.</p>")
    if verification.get("outputs"):
        header = [("output", False), ("shape", False), ("max_abs", True), ("mean_abs", True), ("max_rel", True),
                  ("cosine", True), ("passes at atol ≥", True), ("or rtol ≥", True), ("passed", False),
                  ("top-1 agreement", True)]  # fmt: skip
        keys = ["name", "shape", "max_abs", "mean_abs", "max_rel", "cosine", "min_atol", "min_rtol", "passed", "agreement"]
        rows = []
        for index, output in enumerate(verification["outputs"]):
            cells = output_cells(output)
            tds = "".join(
                _td(cells[k], col=k, numeric=num, sort=_sort_value(output.get(_JSON_KEY.get(k, k))) if num else None)
                for k, (_, num) in zip(keys, header)
            )
            rows.append(f'<tr data-index="{index}">{tds}</tr>')
        parts.append(_html_table(header, rows, table_id="outputs"))
    if verification.get("problems"):
        parts.append('<ul class="notes problems">' + "".join(f"<li>{_e(p)}</li>" for p in verification["problems"]) + "</ul>")
    return parts


_JSON_KEY = {"agreement": "argmax_agreement"}  # output cells whose JSON field has another name


def _layers(data: Mapping[str, Any]) -> list[str]:
    """The MACs chart, the sortable layers table and the passes that ran."""
    layers = data["layers"]
    parts = ['<h2 id="chart">MACs per conv</h2>']
    if layers:
        parts.append(f'<div class="chart">{macs_chart_svg(layers)}</div>')
    else:
        parts.append(f"<p>{NO_CONVS}</p>")
    parts.append(f'<h2 id="layers">Layers ({len(layers)})</h2>')
    if layers:
        parts.append('<p class="hint">Click a column header to sort.</p>')
        parts.append(layers_table_html(layers))
    if data["passes"]:
        parts.append(f'<p class="hint">Passes: {_e(passes_text(data["passes"]))}.</p>')
    return parts


def _sweep(sweep: Sequence[Mapping[str, Any]], *, current: float | None) -> list[str]:
    """The trade-off chart and the table of sweep points."""
    parts = ['<h2 id="sweep">Trade-off: MACs against estimated error</h2>']
    parts.append(f'<div class="chart">{sweep_chart_svg(sweep, current=current)}</div>')
    columns = sweep_columns(sweep)
    header = [(c, True) for c in columns]
    rows = []
    for index, point in enumerate(sweep):
        tds = "".join(
            _td(sweep_cell(c, point.get(c)), col=c, numeric=True,
                sort=_sort_value(point.get(c)) if isinstance(point.get(c), (int, float)) else None)
            for c in columns
        )  # fmt: skip
        rows.append(f'<tr data-index="{index}">{tds}</tr>')
    parts.append('<div class="gap"></div>' + _html_table(header, rows, table_id="sweep-table", compact=True))
    return parts


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
    with_model_output_error = any(layer.get("model_output_error") is not None for layer in layers)
    if with_model_output_error:
        header.append(("model-output err", True))
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
        if with_model_output_error:
            tds.append(_td(cells["model_output_error"], col="model_output_error",
                           sort=_sort_value(layer.get("model_output_error")) if rewritten else "", numeric=True))  # fmt: skip
        if with_latency:
            for key in ("latency_before_ms", "latency_after_ms"):
                value = layer.get(key)
                tds.append(_td("" if value is None else f"{value:.3g}", col=key, sort=_sort_value(value), numeric=True))
        status = "rewritten" if rewritten else "skipped"
        rows.append(f'<tr class="{status}" data-index="{index}">{"".join(tds)}</tr>')
    return _html_table(header, rows, table_id="layers-table")

