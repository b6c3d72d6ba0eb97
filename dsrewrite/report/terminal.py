"""The report in the terminal: the savings table (collapsed or cut to --top), totals and verdict.

Only this module of the report imports rich; the package loads it on first use of
:func:`render_terminal`, so the file formats stay cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from ..plan import REWRITTEN
from .model import Report, ratio_of
from .text import (
    COLLAPSE_OVER,
    NO_CONVS,
    benchmark_figures,
    comparisons_text,
    convs_text,
    fmt_error,
    fmt_model_output_error,
    fmt_ms,
    fmt_ratio,
    fmt_speedup,
    human,
    layer_cells,
    output_cells,
    passes_text,
    verdict,
    verification_scope,
)

if TYPE_CHECKING:  # only annotated: importing verify would load onnx and onnxruntime
    from ..verify import VerificationResult


def render_terminal(report: Report, console: Console, *, top: int | None = None) -> None:
    """The savings table, totals and verification verdict.

    ``top``: show only the ``top`` layers with the largest MACs before (largest first).
    With more than :data:`COLLAPSE_OVER` rows, rows of identical configuration are
    collapsed into one (MACs and params summed). The report files always have every layer.
    """
    data = report.data()
    layers = data["layers"]
    shown = _top_layers(layers, top)
    rows = [(layer, 1) for layer in shown]
    if len(rows) > COLLAPSE_OVER:
        rows = _collapse(shown)
    console.print(_layers_table(report, layers, rows))
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
    _print_totals(data["totals"], console)
    _print_latency(report, console)
    if report.passes:
        console.print(f"Passes: {passes_text(report.passes)}.")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {rich_escape(note)}")
    _print_verification(data["verification"], console)


def _top_layers(layers: list[dict[str, Any]], top: int | None) -> list[dict[str, Any]]:
    """The ``top`` layers with the most MACs before (unknown last), or all of them."""
    if top is None or top >= len(layers):
        return layers
    order = sorted(range(len(layers)), key=lambda i: (layers[i]["macs_before"] is None, -(layers[i]["macs_before"] or 0), i))
    return [layers[i] for i in order[:top]]


def _layers_table(report: Report, layers: list[dict[str, Any]], rows: list[tuple[dict[str, Any], int]]) -> Table:
    with_output_error = any(layer.get("output_error") is not None for layer in layers)
    with_model_output_error = any(layer.get("model_output_error") is not None for layer in layers)
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
    if with_model_output_error:
        columns.append(("model-output err", "right"))
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
        if with_model_output_error:
            row.append(layer.get("_model_output_error_text", cells["model_output_error"]))
        table.add_row(*row)
    return table


def _print_totals(totals: Mapping[str, Any], console: Console) -> None:
    if totals["convs"] == 0:
        console.print(NO_CONVS)
        return
    console.print(f"Convs: {convs_text(totals)}")
    console.print(
        f"Conv MACs: {human(totals['macs_before'])} → {human(totals['macs_after'])} "
        f"({fmt_ratio(totals['macs_ratio'])}); eligible convs: {human(totals['eligible_macs_before'])} → "
        f"{human(totals['eligible_macs_after'])} ({fmt_ratio(totals['eligible_macs_ratio'])}). "
        f"Conv params: {human(totals['params_before'])} → {human(totals['params_after'])}."
    )


def _print_latency(report: Report, console: Console) -> None:
    bench = benchmark_figures(report.benchmark)
    if bench is None or (bench["before_ms"] is None and bench["after_ms"] is None):
        return
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
    more = comparisons_text(report.benchmark)
    if more:
        console.print(f"Also measured: {more}.")


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
        merged["macs_ratio"] = ratio_of(merged["macs_per_pixel_after"], merged["macs_per_pixel_before"])
        for key in ("weight_error", "output_error", "model_output_error"):
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                fmt = fmt_model_output_error if key == "model_output_error" else fmt_error
                low, high = fmt(min(values)), fmt(max(values))
                merged[f"_{key}_text"] = low if low == high else f"{low}–{high}"
        rows.append((merged, len(members)))
    return rows


def render_verification(verification: VerificationResult | None, console: Console) -> None:
    """The verdict, each output's statistics and the problems found, worded by ``text`` like the files."""
    _print_verification(verification.to_dict() if verification is not None else {"ran": False}, console)


def _print_verification(verification: Mapping[str, Any], console: Console) -> None:
    verdict_text = verdict(verification)
    if not verification.get("ran"):
        console.print(f"Verification: {verdict_text}.")
        return
    style = {"passed": "green", "compared": "cyan"}.get(verdict_text, "red")
    console.print(
        f"Verification in onnxruntime: [{style}]{verdict_text.upper()}[/{style}] "
        f"on {verification_scope(verification, rich_escape)}."
    )
    for output in verification.get("outputs") or []:
        cells = output_cells(output)
        console.print(
            f"  {rich_escape(cells['name'])}: max_abs={cells['max_abs']} mean_abs={cells['mean_abs']} "
            f"max_rel={cells['max_rel']} cosine={cells['cosine']}"
            + (f" top-1 agreement={cells['agreement']}" if output.get("argmax_agreement") is not None else "")
            + f"; would pass with atol>={cells['min_atol']} or rtol>={cells['min_rtol']}"
        )
    for problem in verification.get("problems") or []:
        console.print(f"  [red]{rich_escape(problem)}[/red]")

