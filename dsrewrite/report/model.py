"""The report's data: the Report record, its totals, the JSON form, and writing a report file.

Every view renders :meth:`Report.data` (the JSON dict, NaN/Inf as null), so this module decides
what the report says and the renderers (``terminal``, ``markdown``, ``html``) only how it reads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..plan import LayerPlan
from .html import render_html
from .markdown import render_markdown

if TYPE_CHECKING:  # only annotated: importing verify would load onnx and onnxruntime
    from ..verify import VerificationResult

SCHEMA = "dsrewrite.report/1"

# File suffix -> renderer name. The CLI accepts the same suffixes.
FORMATS = {".json": "json", ".md": "markdown", ".html": "html"}


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
        return ratio_of(self.macs_after, self.macs_before)

    @property
    def eligible_macs_ratio(self) -> float | None:
        return ratio_of(self.eligible_macs_after, self.eligible_macs_before)

    @property
    def params_ratio(self) -> float | None:
        return ratio_of(self.params_after, self.params_before)

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
    # What distillation fine-tuning did (steps, seconds, losses, stack, targets), when it ran.
    finetune: dict[str, Any] | None = None
    # What the output guard measured and left alone (output_guard.GuardOutcome.record), when it ran.
    output_guard: dict[str, Any] | None = None

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
        if self.finetune is not None:
            data["finetune"] = self.finetune
        if self.output_guard is not None:
            data["output_guard"] = self.output_guard
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
    from ..model_io import atomic_write_text  # noqa: PLC0415 (keeps the report importable without onnx I/O)

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
    data["macs_ratio"] = ratio_of(layer.macs_per_pixel_after, layer.macs_per_pixel_before)
    return data


def ratio_of(after, before) -> float | None:
    """after / before; None when either is unknown or before is 0."""
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

