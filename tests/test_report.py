"""The savings report in every format: JSON, Markdown, HTML and the terminal agree on every number.

Each view is parsed back and compared, cell by cell, against the JSON written from the same
Report, formatted with the report's own helpers (``layer_cells``, ``human``, ...).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from importlib import resources

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from rich.console import Console

import dsrewrite
from dsrewrite.errors import UsageError
from dsrewrite.plan import LayerPlan
from dsrewrite.report import (
    COLLAPSE_OVER,
    Report,
    fmt_cosine,
    fmt_ratio,
    fmt_stat,
    human,
    layer_cells,
    macs_chart_svg,
    md_code,
    render_terminal,
    report_format,
    sweep_chart_svg,
    verification_scope,
)
from dsrewrite.report.charts import _nice_ticks
from dsrewrite.verify import OutputComparison, VerificationResult

SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@pytest.fixture(scope="module")
def vgg_report() -> Report:
    return dsrewrite.rewrite(str(SAMPLES / "vgg_small.onnx"), rank=2).report


@pytest.fixture(scope="module")
def grouped_report() -> Report:
    """Two of five convs skipped (depthwise, 1x1), one in the multiplier form."""
    return dsrewrite.rewrite(str(SAMPLES / "grouped_depthwise.onnx"), rank=2).report


@pytest.fixture(params=["vgg", "grouped"])
def report(request, vgg_report, grouped_report) -> Report:
    return {"vgg": vgg_report, "grouped": grouped_report}[request.param]


def synthetic_report(n: int, *, unknown_every: int = 0, names=None, **kwargs) -> Report:
    """``n`` convs in five stages; every third is a skipped 1x1; optionally some MACs unknown."""
    layers = []
    for i in range(n):
        stage = i * 5 // n
        c, k = 16 << stage, (1 if i % 3 == 0 else 3)
        hw = (64 >> stage) ** 2
        per_pixel = c * c * k * k
        after = per_pixel if k == 1 else 2 * c * k * k + 2 * c * c
        unknown = unknown_every and i % unknown_every == 0
        layers.append(
            LayerPlan(
                node=names[i] if names else f"stage{stage}/conv{i}",
                op="Conv",
                status="skipped" if k == 1 else "rewritten",
                reason="1x1 kernel: already pointwise" if k == 1 else None,
                rank=None if k == 1 else 2,
                form=None if k == 1 else "concat",
                kernel=[k, k],
                in_channels=c,
                out_channels=c,
                group=1,
                macs_before=None if unknown else per_pixel * hw,
                macs_after=None if unknown else after * hw,
                params_before=per_pixel + c,
                params_after=after + c,
                macs_per_pixel_before=per_pixel,
                macs_per_pixel_after=after,
                weight_error=None if k == 1 else 0.1 + 0.001 * i,
                eligible=k != 1,
                output=f"t{i}",
            )
        )
    return Report(model={"input": "synthetic.onnx", "dsrewrite_version": "test"}, settings={"rank": 2}, layers=layers,
                  **kwargs)  # fmt: skip


# -- parsing the renderings back ----------------------------------------------------------------


def md_rows(markdown: str, first_header: str) -> list[list[str]]:
    """Cells of the Markdown table whose header starts with ``first_header``; ``\\|`` unescaped."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([md_unescape(c.strip()) for c in cells])
    return rows


def md_unescape(cell: str) -> str:
    if cell.startswith("`") and cell.endswith("`"):
        cell = cell.strip("`").strip() if cell.startswith("``") else cell[1:-1]
        return cell.replace("\\|", "|")
    return re.sub(r"\\(.)", r"\1", cell)


class TableParser(HTMLParser):
    """Rows of ``<table id=table_id>``: per row a dict data-col -> (text, data-sort)."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.rows, self.cell = table_id, False, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.inside = attrs.get("id") == self.table_id
        elif self.inside and tag == "tr":
            self.rows.append({})
        elif self.inside and tag == "td":
            self.cell = [attrs.get("data-col"), "", attrs.get("data-sort")]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.rows[-1][self.cell[0]] = (self.cell[1], self.cell[2])
            self.cell = None
        elif tag == "table":
            self.inside = False


def html_rows(page: str, table_id: str) -> list[dict]:
    parser = TableParser(table_id)
    parser.feed(page)
    return [row for row in parser.rows if row]


def terminal_text(report: Report, width: int = 250, **kwargs) -> str:
    buffer = io.StringIO()
    render_terminal(report, Console(file=buffer, width=width, no_color=True, highlight=False), **kwargs)
    return buffer.getvalue()


def exact(value) -> str:
    return "" if value is None else (repr(value) if isinstance(value, float) else str(value))


# -- consistency ----------------------------------------------------------------------------------


def test_markdown_layer_table_equals_the_json(report):
    data = json.loads(report.to_json())
    rows = md_rows(report.to_markdown(), "#")
    assert len(rows) == len(data["layers"]) > 0
    for row, layer in zip(rows, data["layers"]):
        cells = layer_cells(layer)
        index, node, channels, kernel, group, decision, macs, ratio, params, weight_error = row[:10]
        assert node == layer["node"]
        assert (channels, kernel, group) == (cells["channels"], cells["kernel"], str(layer["group"]))
        assert macs == cells["macs"] and params == cells["params"] and ratio == cells["ratio"]
        if layer["status"] == "rewritten":
            assert decision.startswith(f"rank {layer['rank']}")
            assert macs == f"{human(layer['macs_before'])}→{human(layer['macs_after'])}"
            assert params == f"{human(layer['params_before'])}→{human(layer['params_after'])}"
            assert ratio == fmt_ratio(layer["macs_ratio"])
            assert weight_error == f"{layer['weight_error']:.3f}"
        else:
            assert decision == f"skip: {layer['reason']}"
            assert macs == human(layer["macs_before"]) and weight_error == ""


def test_html_layer_table_equals_the_json(report):
    data = json.loads(report.to_json())
    rows = html_rows(report.to_html(), "layers-table")
    assert len(rows) == len(data["layers"]) > 0
    for row, layer in zip(rows, data["layers"]):
        cells = layer_cells(layer)
        assert row["node"][0] == layer["node"]
        for key in ("macs_before", "macs_after", "params_before", "params_after"):
            assert row[key] == (human(layer[key]), exact(layer[key])), key
        assert row["decision"][0] == cells["decision"]
        if layer["status"] == "rewritten":
            assert row["decision"][1] == str(layer["rank"])
            assert row["ratio"] == (fmt_ratio(layer["macs_ratio"]), exact(layer["macs_ratio"]))
            assert row["weight_error"] == (f"{layer['weight_error']:.3f}", exact(layer["weight_error"]))
        else:
            assert row["decision"][0] == f"skip: {layer['reason']}"
            assert row["ratio"][0] == "" and row["weight_error"][0] == ""


def test_terminal_rows_equal_the_json(report):
    data = json.loads(report.to_json())
    text = terminal_text(report)
    for layer in data["layers"]:
        cells = layer_cells(layer)
        line = next(line for line in text.splitlines() if f" {layer['node']} " in line)
        for key in ("channels", "kernel", "decision", "macs", "params", "ratio", "weight_error"):
            assert cells[key] in line, (key, line)
    totals = data["totals"]
    assert f"Conv MACs: {human(totals['macs_before'])} → {human(totals['macs_after'])} ({fmt_ratio(totals['macs_ratio'])})" in text


def test_summaries_agree_on_totals_and_verification(report):
    data = json.loads(report.to_json())
    totals, verification = data["totals"], data["verification"]
    markdown, page, terminal = report.to_markdown(), report.to_html(), terminal_text(report)

    summary = {row[0]: row[1:] for row in md_rows(markdown, "")}
    assert summary["Conv MACs"] == [human(totals["macs_before"]), human(totals["macs_after"]), fmt_ratio(totals["macs_ratio"])]
    assert summary["Eligible conv MACs"] == [
        human(totals["eligible_macs_before"]), human(totals["eligible_macs_after"]), fmt_ratio(totals["eligible_macs_ratio"])
    ]  # fmt: skip
    assert summary["Conv params"][:2] == [human(totals["params_before"]), human(totals["params_after"])]
    assert f"{totals['rewritten']} rewritten, {totals['skipped']} skipped of {totals['convs']}" in markdown
    for text in (f"{human(totals['macs_before'])} → {human(totals['macs_after'])}",
                 f"ratio {fmt_ratio(totals['eligible_macs_ratio'])}"):  # fmt: skip
        assert text in page

    assert verification["ran"] and verification["passed"] is None  # no tolerance set: compared, not passed
    scope = verification_scope(verification)
    assert f"**Verification in onnxruntime: compared** on {scope}." in markdown
    assert f'class="badge none">compared</span> on {scope}.' in page
    assert f"Verification in onnxruntime: COMPARED on {scope}." in terminal
    md_outputs, html_outputs = md_rows(markdown, "output"), html_rows(page, "outputs")
    for output, md_row, html_row in zip(verification["outputs"], md_outputs, html_outputs, strict=True):
        stats = [fmt_stat(output["max_abs"]), fmt_stat(output["mean_abs"]), fmt_stat(output["max_rel"]), fmt_cosine(output["cosine"])]
        assert md_row[0] == output["name"] and md_row[2:6] == stats
        assert [html_row[k][0] for k in ("max_abs", "mean_abs", "max_rel", "cosine")] == stats
        assert html_row["max_abs"][1] == repr(output["max_abs"])
        assert f"max_abs={stats[0]} mean_abs={stats[1]} max_rel={stats[2]} cosine={stats[3]}" in terminal


def test_failed_and_skipped_verification_read_the_same_in_every_view():
    nan = float("nan")  # a shape mismatch leaves no statistics
    failed = VerificationResult(ran=True, passed=False, inputs="random", samples=2, outputs=[
        OutputComparison("y", [1, 4], nan, nan, nan, nan, False, nan, nan, False)], problems=["output y: shape differs"])  # fmt: skip
    report = synthetic_report(3, verification=failed)
    markdown, page, terminal = report.to_markdown(), report.to_html(), terminal_text(report)
    scope = "2 random sample(s); no tolerance set (shapes, dtypes and finiteness only)"
    assert f"**Verification in onnxruntime: FAILED** on {scope}." in markdown
    assert f'class="badge fail">FAILED</span> on {scope}.' in page
    assert f"Verification in onnxruntime: FAILED on {scope}." in terminal
    assert md_rows(markdown, "output")[0][2:6] == ["?"] * 4  # NaN is null in the JSON, '?' everywhere
    assert [cell[0] for cell in html_rows(page, "outputs")[0].values()][2:6] == ["?"] * 4
    assert "y: max_abs=? mean_abs=? max_rel=? cosine=?; would pass with atol>=? or rtol>=?" in terminal
    assert all("output y: shape differs" in text for text in (markdown, page, terminal))

    report = synthetic_report(3, verification=None)
    markdown, page, terminal = report.to_markdown(), report.to_html(), terminal_text(report)
    assert "**Verification in onnxruntime: not run**" in markdown and "<p>Not run.</p>" in page
    assert "Verification: not run." in terminal and "sample(s)" not in markdown + page + terminal


def test_grouped_sample_has_skips_and_the_multiplier_form(grouped_report):
    rows = md_rows(grouped_report.to_markdown(), "#")
    decisions = [row[5] for row in rows]
    assert "rank 2 (multiplier)" in decisions
    assert sum(d.startswith("skip: ") for d in decisions) == 2
    assert "already depthwise" in " ".join(decisions) and "1x1 kernel" in " ".join(decisions)


# -- the schema -----------------------------------------------------------------------------------


def test_json_schema_only_grows(vgg_report):
    data = json.loads(vgg_report.to_json())
    assert data["schema"] == "dsrewrite.report/1"
    assert set(data) >= {"model", "settings", "totals", "layers", "verification", "passes", "notes"}
    assert "benchmark" not in data and "sweep" not in data
    assert data["totals"]["params_ratio"] == pytest.approx(data["totals"]["params_after"] / data["totals"]["params_before"])


def test_sweep_and_benchmark_appear_in_every_format():
    sweep = [{"target": t, "eligible_macs_ratio": t * 0.95, "estimated_error": (1 - t) ** 2, "score": 1 - t,
              "ranks": {"t1": 1}} for t in (0.2, 0.4, 0.6, 1.0)]  # fmt: skip
    benchmark = {"threads": 1, "runs": 40, "latency_before_ms": 12.5, "latency_after_ms": 5.0, "speedup": 2.5,
                 "spread_before_ms": [12.0, 13.0], "predicted_speedup": 2.9}  # as latency.benchmark_models + api
    report = synthetic_report(6, sweep=sweep, benchmark=benchmark)
    data = json.loads(report.to_json())
    assert data["sweep"][0]["estimated_error"] == sweep[0]["estimated_error"] and data["benchmark"] == benchmark
    markdown, page, terminal = report.to_markdown(), report.to_html(), terminal_text(report)
    for text in (markdown, page):
        assert "12.5 ms" in text and "5 ms" in text and "2.50×" in text
    assert "Latency in onnxruntime: 12.5 ms → 5 ms (measured speedup 2.50×)" in terminal
    assert "spread\\_before\\_ms=12, 13" in markdown and "predicted_speedup=2.9" in page
    assert "### Trade-off sweep" in markdown and md_rows(markdown, "target")[0][:3] == ["0.2", "0.190", "0.64"]
    assert 'id="sweep"' in page and "<polyline" in page and "estimated error" in page
    assert [row["estimated_error"][1] for row in html_rows(page, "sweep-table")] == [repr(p["estimated_error"]) for p in sweep]


def test_per_conv_latency_columns_appear_when_measured():
    report = synthetic_report(3)
    assert "conv latency" not in report.to_markdown() and "conv ms before" not in report.to_html()
    report.layers[1].latency_before_ms, report.layers[1].latency_after_ms = 0.5, 0.25
    rows = md_rows(report.to_markdown(), "#")
    assert rows[1][-1] == "0.5 ms→0.25 ms" and rows[0][-1] == ""
    row = html_rows(report.to_html(), "layers-table")[1]
    assert row["latency_before_ms"] == ("0.5", "0.5") and row["latency_after_ms"] == ("0.25", "0.25")


# -- escaping -------------------------------------------------------------------------------------


def test_markdown_escapes_pipes_and_html_escapes_everything():
    names = ["a|b", "<script>alert(1)</script>", "x`y", "plain"]
    report = synthetic_report(4, names=names, notes=["note <b>&</b> | pipe"])
    markdown = report.to_markdown()
    rows = md_rows(markdown, "#")
    assert [row[1] for row in rows] == names
    assert all(len(row) == 10 for row in rows)  # no stray column from the pipe
    assert "a\\|b" in markdown
    assert md_code("a|b") == "`a\\|b`" and md_code("x`y") == "``x`y``"

    page = report.to_html()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>&</b>" not in page and "note &lt;b&gt;&amp;&lt;/b&gt; | pipe" in page
    assert [row["node"][0] for row in html_rows(page, "layers-table")] == names


# -- HTML: self-contained, charts -----------------------------------------------------------------


def test_html_loads_nothing(vgg_report):
    page = vgg_report.to_html()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "http://" not in page.replace(f'xmlns="{SVG_NAMESPACE}"', "") and "https://" not in page
    for forbidden in ("<link", " src=", "@import", "url(", "<img", "<iframe", "fetch(", "XMLHttpRequest"):
        assert forbidden not in page, forbidden
    assert page.count("<svg") == 1 and "<script>" in page and "<style>" in page


def test_html_inlines_the_packaged_assets(vgg_report):
    page = vgg_report.to_html()
    assets = resources.files("dsrewrite.report") / "assets"
    for name, tag in (("report.css", "style"), ("report.js", "script")):
        text = (assets / name).read_text(encoding="utf-8")
        assert text.strip() and f"<{tag}>\n{text}</{tag}>" in page


def test_the_report_package_imports_without_onnx_or_rich():
    code = "import sys, dsrewrite.report; print(sorted({'onnx', 'onnxruntime', 'rich'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("n", [1, 7, 41, 300])
def test_macs_chart_scales_to_many_layers(n):
    layers = json.loads(synthetic_report(n, unknown_every=5).to_json())["layers"]
    svg = macs_chart_svg(layers)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<title>") == n  # one tooltip group per conv, unknown ones included
    height = float(re.search(r'viewBox="0 0 \d+ ([\d.]+)"', svg).group(1))
    assert height <= 52 + 12 + max(24 * n, 1200 + 24)
    if 1 < n <= COLLAPSE_OVER:  # (a single unknown conv falls back to per-pixel MACs)
        assert "MACs unknown" in svg


def test_macs_chart_falls_back_to_per_pixel_macs_when_all_are_unknown():
    layers = json.loads(synthetic_report(3, unknown_every=1).to_json())["layers"]
    svg = macs_chart_svg(layers)
    assert "MACs per output pixel" in svg and "MACs unknown" not in svg
    for layer in layers:
        layer["macs_per_pixel_before"] = layer["macs_per_pixel_after"] = None
    assert svg.count("<rect") > macs_chart_svg(layers).count("<rect")
    assert macs_chart_svg(layers).count("MACs unknown") == 3


def test_sweep_chart_handles_missing_values_and_marks_this_report():
    svg = sweep_chart_svg([{"eligible_macs_ratio": None, "estimated_error": 1.0}], current=0.3)
    assert "no sweep point" in svg
    svg = sweep_chart_svg([{"eligible_macs_ratio": 0.2, "estimated_error": 0.5, "rank": 1},
                           {"eligible_macs_ratio": 0.6, "estimated_error": 0.1, "rank": 4}], current=0.3)  # fmt: skip
    assert svg.count("<circle") == 2 and "rank 1" in svg and "this report: 0.300" in svg


def test_png_decoder_reads_every_filter_type(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    raw, previous = b"", np.zeros(12, dtype=np.int64)
    for y, kind in enumerate([0, 1, 2, 3, 4]):
        row = image[y].reshape(-1).astype(np.int64)
        left = np.concatenate([[0, 0, 0], row[:-3]])
        up_left = np.concatenate([[0, 0, 0], previous[:-3]])
        if kind == 4:
            pa, pb, pc = np.abs(previous - up_left), np.abs(left - up_left), np.abs(left + previous - 2 * up_left)
            predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, up_left))
        else:
            predictor = [0 * row, left, previous, (left + previous) // 2][kind]
        raw += bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes()
        previous = row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = tmp_path / "t.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 5, 8, 2, 0, 0, 0))
                    + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))  # fmt: skip
    assert np.array_equal(read_png_rgb(png), image)


def test_nice_ticks():
    assert _nice_ticks(0) == [0.0, 1.0]
    assert _nice_ticks(18_874_368) == [0, 5e6, 1e7, 1.5e7, 2e7]
    assert _nice_ticks(1.0) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


# -- the terminal for large models ----------------------------------------------------------------


def test_terminal_collapses_identical_layers_above_40():
    report = synthetic_report(200)
    text = terminal_text(report)
    table_rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(table_rows) == 10  # 5 stages × (3×3, 1×1)
    assert "stage0/conv0 … (×14)" in text and "200 convs in 10 rows" in text
    layers = json.loads(report.to_json())["layers"]
    group = [layer for layer in layers if layer["in_channels"] == 16 and layer["kernel"] == [3, 3]]
    total_before, total_after = sum(x["macs_before"] for x in group), sum(x["macs_after"] for x in group)
    assert f"{human(total_before)}→{human(total_after)}" in text
    # the files keep every layer
    assert len(md_rows(report.to_markdown(), "#")) == 200
    assert len(html_rows(report.to_html(), "layers-table")) == 200
    # a small model is never collapsed
    assert "…" not in terminal_text(synthetic_report(COLLAPSE_OVER))


def test_terminal_top_shows_the_largest_layers():
    report = synthetic_report(30)
    layers = json.loads(report.to_json())["layers"]
    text = terminal_text(report, top=3)
    largest = sorted(layers, key=lambda layer: -layer["macs_before"])[:3]
    shown = [line for line in text.splitlines() if line.startswith("│")]
    assert len(shown) == 3
    assert all(any(f" {layer['node']} " in line for line in shown) for layer in largest)
    assert "27 more hidden" in text
    assert "more hidden" not in terminal_text(report, top=30)


# -- files ------------------------------------------------------------------------------------------


def test_write_picks_the_format_by_extension(vgg_report, tmp_path):
    for name in ("r.json", "r.md", "r.html", "R.HTML"):
        vgg_report.write(tmp_path / name)
    assert json.loads((tmp_path / "r.json").read_text()) == vgg_report.data()
    assert (tmp_path / "r.md").read_text() == vgg_report.to_markdown()
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == vgg_report.to_html()
    assert report_format("R.HTML") == "html"
    with pytest.raises(UsageError, match="unknown format"):
        vgg_report.write(tmp_path / "r.txt")
    assert not (tmp_path / "r.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.HTML", "r.html", "r.json", "r.md"]  # no temp files left


def test_cli_writes_every_report_format(tmp_path):
    from dsrewrite.cli import main  # noqa: PLC0415

    reports = [tmp_path / f"r.{ext}" for ext in ("json", "md", "html")]
    args = [str(SAMPLES / "grouped_depthwise.onnx"), "--dry-run", "--rank", "2"]
    for path in reports:
        args += ["--report", str(path)]
    runner = CliRunner()
    with runner.isolation() as (out, err, *_):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    assert exit_info.value.code == 0, err.getvalue()
    data = json.loads(reports[0].read_text())
    assert [row[1] for row in md_rows(reports[1].read_text(), "#")] == [layer["node"] for layer in data["layers"]]
    html_macs = [row["macs_before"][1] for row in html_rows(reports[2].read_text(), "layers-table")]
    assert html_macs == [str(layer["macs_before"]) for layer in data["layers"]]


# -- rendered in a real browser ---------------------------------------------------------------------


def read_png_rgb(path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) without Pillow."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    assert depth == 8 and interlace == 0 and color in (2, 6)
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int64)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:
            cur = np.cumsum(line.reshape(width, bpp), axis=0).ravel() % 256
        elif kind == 2:
            cur = (line + prev) % 256
        else:  # average / Paeth: sequential along the row
            values, up, cur_list = line.tolist(), prev.tolist(), [0] * stride
            for i in range(stride):
                a = cur_list[i - bpp] if i >= bpp else 0
                b = up[i]
                if kind == 3:
                    cur_list[i] = (values[i] + (a + b) // 2) & 255
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    cur_list[i] = (values[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.array(cur_list, dtype=np.int64)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)[:, :, :3].astype(np.uint8)


def test_html_renders_in_headless_chromium(vgg_report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed")
    report = Report(**{**vgg_report.__dict__, "sweep": [
        {"target": t, "eligible_macs_ratio": t, "estimated_error": (1 - t) ** 2} for t in (0.2, 0.5, 1.0)
    ]})  # fmt: skip
    page = tmp_path / "report.html"
    report.write(page)
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text.replace(f'xmlns="{SVG_NAMESPACE}"', "") and "https://" not in text
    shot = tmp_path / "shot.png"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
               page.as_uri()]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish within 60 s")
    _assert_screenshot_shows_a_page(shot)

    # Clicking a header sorts numerically: "MACs before" twice (descending), then "ratio" (ascending, blanks last).
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", _SORT_PROBE + "</body>"), encoding="utf-8")
    command[-1] = probe.as_uri()
    command = [c for c in command if not c.startswith(("--screenshot", "--window-size"))]
    try:
        dom = subprocess.run(command + ["--dump-dom"], check=True, capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish within 60 s")
    by_macs, by_ratio = re.search(r'<pre id="probe">(.*?)</pre>', dom).group(1).split(" | ")
    layers = report.data()["layers"]
    expected = sorted(layers, key=lambda layer: -layer["macs_before"])
    assert by_macs.split(",") == [layer["node"] for layer in expected]
    expected = sorted(layers, key=lambda layer: layer["macs_ratio"])
    assert by_ratio.split(",") == [layer["node"] for layer in expected]


_SORT_PROBE = """<pre id="probe"></pre><script>
(function () {
  var table = document.getElementById("layers-table"), heads = table.tHead.rows[0].cells;
  function names() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[1].textContent; }).join(","); }
  heads[6].click(); heads[6].click();
  var first = names();
  heads[8].click();
  document.getElementById("probe").textContent = first + " | " + names();
})();
</script>"""


def _assert_screenshot_shows_a_page(shot):
    try:  # Pillow is faster where installed; the fallback decoder needs only numpy
        from PIL import Image  # noqa: PLC0415

        pixels = np.asarray(Image.open(shot).convert("RGB"))
    except ImportError:
        pixels = read_png_rgb(shot)
    assert pixels.shape[:2] == (2000, 1280)
    rgb = pixels.astype(np.int64)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    non_white = np.any(pixels < 245, axis=2).mean()
    assert len(colours) > 16, "the page looks blank"
    assert 0.03 < non_white < 0.8, f"{non_white:.1%} of the page is not white"
    # the bar chart's teal "after" bars were drawn
    teal = np.all(np.abs(pixels.astype(int) - (0x1F, 0x9D, 0x8B)) < 12, axis=2).sum()
    assert teal > 500


def test_top1_agreement_reads_the_same_in_every_view():
    output = OutputComparison("logits", [8, 10], 0.5, 0.1, 2.0, 0.97, True, 0.5, 2.0, True, 0.83)
    report = synthetic_report(3, verification=VerificationResult(ran=True, passed=None, samples=8, outputs=[output]))
    markdown, page, terminal = report.to_markdown(), report.to_html(), terminal_text(report)
    assert "top-1 agreement=83.0%" in terminal
    assert md_rows(markdown, "output")[0][-1] == "83.0%"
    assert list(html_rows(page, "outputs")[0].values())[-1][0] == "83.0%"
    assert json.loads(report.to_json())["verification"]["outputs"][0]["argmax_agreement"] == 0.83
