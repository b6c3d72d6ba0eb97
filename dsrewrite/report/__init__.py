"""The savings report: one Report object, rendered as a terminal table, JSON, Markdown or HTML.

Only this package formats, one concern per module: ``model`` (the Report, totals, JSON, writing
files), ``text`` (the wording every view shares), ``terminal``, ``markdown``, ``html`` and
``charts`` (the inline SVG of the HTML page). Every number in every rendering comes from the same
:class:`Report`: all views render :meth:`Report.data` (the JSON dict, NaN/Inf as null) through the
helpers of ``text``, so the views cannot disagree.

Importing the package loads neither onnx nor rich: the terminal renderer, the only user of rich,
loads on first use (PEP 562), and writing a file loads ``model_io`` only then.
"""

from .charts import macs_chart_svg, sweep_chart_svg
from .html import NUM_CLASS, layers_table_html, render_html
from .markdown import md_code, md_text, render_markdown
from .model import FORMATS, SCHEMA, Report, Totals, compute_totals, report_format, write_report
from .text import (
    COLLAPSE_OVER,
    NO_CONVS,
    benchmark_figures,
    convs_text,
    fmt_cosine,
    fmt_error,
    fmt_ms,
    fmt_ratio,
    fmt_speedup,
    fmt_stat,
    fmt_value,
    human,
    layer_cells,
    model_title,
    output_cells,
    passes_text,
    settings_text,
    sweep_cell,
    tolerance_text,
    verdict,
    verification_scope,
)

_fmt_ratio = fmt_ratio  # the old private name

# Loaded on first use: they need rich.
_TERMINAL = ("render_terminal", "render_verification")

__all__ = [
    "COLLAPSE_OVER", "FORMATS", "NO_CONVS", "NUM_CLASS", "SCHEMA", "Report", "Totals", "benchmark_figures",
    "compute_totals", "convs_text", "fmt_cosine", "fmt_error", "fmt_ms", "fmt_ratio", "fmt_speedup", "fmt_stat",
    "fmt_value", "human", "layer_cells", "layers_table_html", "macs_chart_svg", "md_code", "md_text", "model_title",
    "output_cells", "passes_text", "render_html", "render_markdown", "render_terminal", "render_verification",
    "report_format", "settings_text", "sweep_cell", "sweep_chart_svg", "tolerance_text", "verdict",
    "verification_scope", "write_report",
]  # fmt: skip


def __getattr__(name: str):
    if name not in _TERMINAL:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import terminal  # noqa: PLC0415 (rich only when the terminal table is wanted)

    value = getattr(terminal, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TERMINAL))
