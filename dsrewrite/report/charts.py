"""The HTML report's two inline SVG charts: MACs per conv (bars) and the sweep trade-off (line).

Pure string building from the report's JSON dicts, no plotting library: the page stays
self-contained. Labels and tooltips use the same wording as the tables (``text``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..plan import REWRITTEN
from .text import COLLAPSE_OVER, fmt_ratio, fmt_value, human, layer_cells, sweep_cell
from .text import escape_html as _e

_FONTS = "system-ui, -apple-system, Segoe UI, Roboto, Arial, sans-serif"


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


# -- MACs per conv ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bars:
    """Geometry of the MACs chart: a label column, the bars, room for the value; one row per conv."""

    n: int
    vmax: float
    label_w, bar_w, value_w = 200, 560, 150
    top, bottom = 52, 12

    @property
    def row(self) -> int:
        return 24 if self.n <= COLLAPSE_OVER else max(5, min(24, 1200 // self.n))

    @property
    def width(self) -> int:
        return self.label_w + self.bar_w + self.value_w

    @property
    def height(self) -> int:
        return self.top + self.n * self.row + self.bottom

    @property
    def font(self) -> int:
        return min(12, self.row - 3)

    @property
    def show_labels(self) -> bool:
        return self.row >= 12

    def x(self, value: float) -> float:
        return self.label_w + self.bar_w * (value / self.vmax if self.vmax else 0)


def macs_chart_svg(layers: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars per conv: MACs before (wide, light) with MACs after overlaid (narrow, dark).

    Unknown MACs (None) get an 'unknown' label instead of a bar; when every conv's MACs are unknown the
    chart falls back to MACs per output pixel and says so. Row height shrinks for many convs (1..300+).
    """
    before_key, after_key, unit = "macs_before", "macs_after", "MACs"
    if all(layer.get("macs_before") is None for layer in layers) and any(
        layer.get("macs_per_pixel_before") is not None for layer in layers
    ):
        before_key, after_key, unit = "macs_per_pixel_before", "macs_per_pixel_after", "MACs per output pixel"
    values = [v for layer in layers for v in (layer.get(before_key), layer.get(after_key)) if v is not None]
    ticks = _nice_ticks(max(values, default=0))
    bars = _Bars(n=len(layers), vmax=ticks[-1])
    unknown_rows = any(layer.get(before_key) is None and layer.get(after_key) is None for layer in layers)
    out = [
        f'<svg viewBox="0 0 {bars.width} {bars.height}" role="img" aria-label="{_e(unit)} per conv, before and after" '
        f'font-family="{_FONTS}" font-size="12">',
        _macs_legend(bars, unit, unknown=unknown_rows and not bars.show_labels),
    ]
    bottom = bars.top + bars.n * bars.row
    for tick in ticks:
        tx = bars.x(tick)
        out.append(
            f'<line x1="{tx:.1f}" y1="{bars.top - 6}" x2="{tx:.1f}" y2="{bottom}" stroke="#e4e7eb" stroke-width="1"/>'
            f'<text x="{tx:.1f}" y="{bars.top - 10}" text-anchor="middle" fill="#616e7c" font-size="11">'
            f"{_e(_tick_label(tick))}</text>"
        )
    for i, layer in enumerate(layers):
        out += _macs_row(bars, i, layer, layer.get(before_key), layer.get(after_key), unit)
    out.append("</svg>")
    return "".join(out)


def _macs_legend(bars: _Bars, unit: str, *, unknown: bool) -> str:
    """Swatches for before / after / skipped (and the dashed 'unknown' when rows are too thin to say so)."""
    label_w = bars.label_w
    return (
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
            if unknown
            else ""
        )
        + f'<text x="{bars.width - 4}" y="10" text-anchor="end" fill="#616e7c">{_e(unit)}</text>'
        "</g>"
    )


def _macs_row(bars: _Bars, i: int, layer: Mapping[str, Any], before: float | None, after: float | None,
              unit: str) -> list[str]:  # fmt: skip
    """One conv: a tooltip group with its name, the before bar, the after bar inside it, the values."""
    row, label_w, font = bars.row, bars.label_w, bars.font
    y = bars.top + i * row
    cells = layer_cells(layer)
    rewritten = layer.get("status") == REWRITTEN
    tip = f"{cells['node']}: {human(before)} → {human(after)} {unit}; {cells['decision']}"
    out = [f"<g><title>{_e(tip)}</title>",
           f'<rect x="0" y="{y}" width="{bars.width}" height="{row}" fill="#ffffff" fill-opacity="0"/>']  # fmt: skip
    if bars.show_labels:
        out.append(
            f'<text x="{label_w - 8}" y="{y + row / 2:.1f}" dy="0.35em" text-anchor="end" fill="#1f2933" '
            f'font-size="{font}">{_e(_truncate(cells["node"], 28))}</text>'
        )
    if before is None and after is None:
        if bars.show_labels:
            out.append(
                f'<text x="{label_w + 4}" y="{y + row / 2:.1f}" dy="0.35em" fill="#9aa5b1" font-style="italic" '
                f'font-size="{font}">MACs unknown</text></g>'
            )
        else:
            out.append(
                f'<line x1="{label_w}" y1="{y + row / 2:.1f}" x2="{label_w + 40}" y2="{y + row / 2:.1f}" '
                f'stroke="#9aa5b1" stroke-width="{max(row / 3, 1):.1f}" stroke-dasharray="3 3"/></g>'
            )
        return out
    gap = 1 if row < 10 else 3
    if before is not None:
        out.append(
            f'<rect x="{label_w}" y="{y + gap / 2:.1f}" width="{max(bars.x(before) - label_w, 0.5):.1f}" '
            f'height="{row - gap:.1f}" rx="{2 if row >= 10 else 0}" fill="#c9d6e3"/>'
        )
    if after is not None:
        inner = max((row - gap) * 0.45, 1)
        out.append(
            f'<rect x="{label_w}" y="{y + (row - inner) / 2:.1f}" width="{max(bars.x(after) - label_w, 0.5):.1f}" '
            f'height="{inner:.1f}" rx="{1 if row >= 10 else 0}" fill="{"#1f9d8b" if rewritten else "#9aa5b1"}"/>'
        )
    if bars.show_labels:
        end = max(bars.x(v) for v in (before, after) if v is not None)
        text = f"{human(before)} → {human(after)}" if rewritten else human(before)
        if before is None or after is None:
            text += " (partly unknown)"
        out.append(
            f'<text x="{end + 6:.1f}" y="{y + row / 2:.1f}" dy="0.35em" fill="#616e7c" font-size="{font}">'
            f"{_e(text)}</text>"
        )
    out.append("</g>")
    return out


# -- sweep trade-off --------------------------------------------------------------------------

# Sweep point keys that label a point in the chart, with their prefixes.
_SWEEP_LABELS = (("label", ""), ("target", "target "), ("rank", "rank "), ("max_error", "max_error "))


def _scalar(value: Any) -> bool:
    return value is not None and not isinstance(value, (dict, list, tuple))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


@dataclass(frozen=True)
class _Plot:
    """Geometry of the sweep chart: the plot area inside its margins, and the data-to-pixel maps."""

    xmax: float
    ymax: float
    width, height = 760, 380
    left, right, top, bottom = 64, 24, 20, 52

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> int:
        return self.height - self.top - self.bottom

    def sx(self, v: float) -> float:
        return self.left + self.plot_w * v / self.xmax

    def sy(self, v: float) -> float:
        return self.top + self.plot_h * (1 - v / self.ymax)


def sweep_chart_svg(sweep: Sequence[Mapping[str, Any]], *, current: float | None = None) -> str:
    """Scatter + line: eligible MACs ratio (x) against estimated error (y), one point per sweep entry.

    ``current``: this report's own eligible MACs ratio, drawn as a dashed vertical line.
    """
    points = []
    for point in sweep:
        px, py = _number(point.get("eligible_macs_ratio")), _number(point.get("estimated_error"))
        if px is not None and py is not None:
            points.append((px, py, point))
    if current is not None and not (isinstance(current, (int, float)) and math.isfinite(current)):
        current = None
    xticks = _nice_ticks(max([p[0] for p in points] + [1.0] + ([current] if current is not None else [])), 5)
    yticks = _nice_ticks(max([p[1] for p in points], default=0) or 1.0, 5)
    plot = _Plot(xmax=xticks[-1], ymax=yticks[-1])
    left, top, plot_w, plot_h = plot.left, plot.top, plot.plot_w, plot.plot_h
    out = [
        f'<svg viewBox="0 0 {plot.width} {plot.height}" role="img" aria-label="trade-off: eligible MACs ratio against '
        f'estimated error" font-family="{_FONTS}" font-size="12">'
    ]
    out += _sweep_axes(plot, xticks, yticks)
    if not points:
        out.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" text-anchor="middle" fill="#9aa5b1">'
            "no sweep point has both a MACs ratio and an error</text></svg>"
        )
        return "".join(out)
    if current is not None:
        cx = plot.sx(current)
        out.append(
            f'<line x1="{cx:.1f}" y1="{top}" x2="{cx:.1f}" y2="{top + plot_h}" stroke="#c2410c" stroke-width="1.5" '
            'stroke-dasharray="5 4"/>'
            f'<text x="{cx + 6:.1f}" y="{top + 14}" fill="#c2410c" font-size="11">this report: {_e(fmt_ratio(current))}</text>'
        )
    out += _sweep_line(plot, sorted(points, key=lambda p: (p[0], p[1])))
    out.append("</svg>")
    return "".join(out)


def _sweep_axes(plot: _Plot, xticks: list[float], yticks: list[float]) -> list[str]:
    """Grid lines with tick labels, the frame and the two axis titles."""
    left, top, plot_w, plot_h = plot.left, plot.top, plot.plot_w, plot.plot_h
    out = []
    for tick in xticks:
        out.append(
            f'<line x1="{plot.sx(tick):.1f}" y1="{top}" x2="{plot.sx(tick):.1f}" y2="{top + plot_h}" stroke="#e4e7eb"/>'
            f'<text x="{plot.sx(tick):.1f}" y="{top + plot_h + 18}" text-anchor="middle" fill="#616e7c" font-size="11">'
            f"{tick:g}</text>"
        )
    for tick in yticks:
        out.append(
            f'<line x1="{left}" y1="{plot.sy(tick):.1f}" x2="{left + plot_w}" y2="{plot.sy(tick):.1f}" stroke="#e4e7eb"/>'
            f'<text x="{left - 8}" y="{plot.sy(tick):.1f}" dy="0.35em" text-anchor="end" fill="#616e7c" font-size="11">'
            f"{tick:.3g}</text>"
        )
    out.append(
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#c5ccd3"/>'
        f'<text x="{left + plot_w / 2:.1f}" y="{plot.height - 10}" text-anchor="middle" fill="#1f2933">'
        "eligible MACs ratio (after / before)</text>"
        f'<text transform="translate(16,{top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" fill="#1f2933">'
        "estimated error</text>"
    )
    return out


def _sweep_line(plot: _Plot, ordered: list[tuple[float, float, Mapping[str, Any]]]) -> list[str]:
    """The line through the points in MACs order, each point a circle with a tooltip and, room allowing, a label."""
    path = " ".join(f"{plot.sx(px):.1f},{plot.sy(py):.1f}" for px, py, _ in ordered)
    out = [f'<polyline points="{path}" fill="none" stroke="#1f9d8b" stroke-width="2" stroke-linejoin="round"/>']
    labelled: list[tuple[float, float]] = []  # label anchors already drawn, to avoid overlaps
    for px, py, point in ordered:
        tip = "; ".join(f"{k}={sweep_cell(k, v)}" for k, v in point.items() if _scalar(v))
        cx, cy = plot.sx(px), plot.sy(py)
        out.append(
            f'<g><title>{_e(tip)}</title><circle cx="{cx:.1f}" cy="{cy:.1f}" r="4.5" fill="#ffffff" '
            'stroke="#1f9d8b" stroke-width="2"/>'
        )
        label = next((f"{prefix}{fmt_value(point[k])}" for k, prefix in _SWEEP_LABELS if _scalar(point.get(k))), None)
        if label is not None and all(abs(cx - lx) > 70 or abs(cy - ly) > 16 for lx, ly in labelled):
            labelled.append((cx, cy))
            anchor, dx = ("end", -7) if cx > plot.left + plot.plot_w - 80 else ("start", 7)
            out.append(
                f'<text x="{cx + dx:.1f}" y="{cy - 8:.1f}" text-anchor="{anchor}" fill="#1f2933" font-size="11">'
                f"{_e(label)}</text>"
            )
        out.append("</g>")
    return out
