"""The report as Markdown: a summary fit for a pull-request comment, with every layer.

Cells are escaped for GitHub tables (:func:`md_text`, :func:`md_code`); the wording comes from ``text``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .text import (
    COLLAPSE_OVER,
    NO_CONVS,
    benchmark_figures,
    comparisons_text,
    convs_text,
    fmt_ms,
    fmt_ratio,
    fmt_speedup,
    fmt_value,
    human,
    layer_cells,
    model_title,
    output_cells,
    settings_text,
    sweep_cell,
    sweep_columns,
    verdict,
    verification_scope,
)

if TYPE_CHECKING:
    from .model import Report

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
    lines = _summary(data) + _verification(data["verification"])
    if data["notes"]:
        lines += ["### Notes", ""] + [f"- {md_text(note)}" for note in data["notes"]] + [""]
    if data.get("sweep"):
        lines += _sweep(data["sweep"])
    lines += _layers(data["layers"])
    lines += ["", f"<sub>dsrewrite {md_text(data['model'].get('dsrewrite_version', ''))}, {data['schema']}</sub>", ""]
    return "\n".join(lines)


def _summary(data: Mapping[str, Any]) -> list[str]:
    """Title, input and settings, the totals table (with latency when benchmarked), the conv counts."""
    totals = data["totals"]
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
    lines += ["", f"**Convs:** {convs_text(totals)}", ""]
    more = comparisons_text(data.get("benchmark"))
    if more:
        lines += [f"**Also measured:** {md_text(more)}.", ""]
    if bench is not None and bench["extras"]:
        extras = ", ".join(f"{md_text(k)}={md_text(fmt_value(v))}" for k, v in bench["extras"].items())
        lines += [f"**Benchmark:** {extras}.", ""]
    return lines


def _verification(verification: Mapping[str, Any]) -> list[str]:
    """The verdict line, the per-output statistics table and the problems found."""
    line = f"**Verification in onnxruntime: {verdict(verification)}**"
    if verification.get("ran"):
        line += f" on {verification_scope(verification, md_text)}."
    lines = [line, ""]
    if verification.get("outputs"):
        keys = ["name", "shape", "max_abs", "mean_abs", "max_rel", "cosine", "min_atol", "min_rtol", "passed", "agreement"]
        header = ["output", "shape", "max_abs", "mean_abs", "max_rel", "cosine", "passes at atol ≥", "or rtol ≥", "passed",
                  "top-1 agreement"]  # fmt: skip
        out_rows = []
        for output in verification["outputs"]:
            cells = output_cells(output)
            out_rows.append([md_code(cells["name"])] + [md_text(cells[k]) for k in keys[1:]])
        lines += _md_table(header, out_rows, "llrrrrrrlr") + [""]
    for problem in verification.get("problems") or []:
        lines.append(f"- :x: {md_text(problem)}")
    if verification.get("problems"):
        lines.append("")
    return lines


def _sweep(sweep: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = sweep_columns(sweep)
    lines = ["### Trade-off sweep", ""]
    lines += _md_table(
        [md_text(c) for c in columns],
        ([md_text(sweep_cell(c, point.get(c))) for c in columns] for point in sweep),
        ["r"] * len(columns),
    )
    lines.append("")
    return lines


def _layers(layers: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every layer, folded into a <details> block past :data:`COLLAPSE_OVER`."""
    lines = [f"### Layers ({len(layers)})", ""]
    if not layers:
        return lines + [NO_CONVS]
    with_output_error = any(layer.get("output_error") is not None for layer in layers)
    with_model_output_error = any(layer.get("model_output_error") is not None for layer in layers)
    with_latency = any(layer.get("latency_before_ms") is not None for layer in layers)
    many = len(layers) > COLLAPSE_OVER
    if many:
        lines += [f"<details><summary>All {len(layers)} convs</summary>", ""]
    header = ["#", "conv", "in→out", "kernel", "g", "rank / skip reason", "MACs before→after", "ratio",
              "params before→after", "weight err"]  # fmt: skip
    if with_output_error:
        header.append("output err")
    if with_model_output_error:
        header.append("model-output err")
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
        if with_model_output_error:
            row.append(md_text(cells["model_output_error"]))
        if with_latency:
            row.append(md_text(cells["latency"]))
        layer_rows.append(row)
    lines += _md_table(header, layer_rows, "rlrrrlrrrr" + "r" * (len(header) - 10))
    if many:
        lines += ["", "</details>"]
    return lines
