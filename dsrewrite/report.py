"""The savings report: one Report object, rendered as a terminal table or JSON.

Only this module formats. Every number in every rendering comes from the same
:class:`Report`, so the views cannot disagree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from .plan import LayerPlan
from .verify import VerificationResult

SCHEMA = "dsrewrite.report/1"


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

    def to_dict(self) -> dict:
        return {
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
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
    sweep: list[dict[str, Any]] | None = None  # trade-off curve points (target, eligible_macs_ratio, estimated_error[, score])

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

    def to_json(self) -> str:
        return json.dumps(_json_safe(self.to_dict()), indent=2, sort_keys=False) + "\n"


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


# -- terminal ---------------------------------------------------------------------------------


def human(n: int | float | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "?"
    n = float(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def render_terminal(report: Report, console: Console) -> None:
    """The savings table, totals and verification verdict."""
    table = Table(title=f"dsrewrite: {report.model.get('input', '')}", title_justify="left")
    for column, justify in (
        ("conv", "left"),
        ("in→out", "right"),
        ("kernel", "right"),
        ("g", "right"),
        ("rank / skip reason", "left"),
        ("MACs before→after", "right"),
        ("ratio", "right"),
        ("params before→after", "right"),
        ("weight err", "right"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for layer in report.layers:
        channels = f"{layer.in_channels}→{layer.out_channels}" if layer.in_channels else "?"
        kernel = "×".join(str(k) for k in layer.kernel) if layer.kernel else "?"
        if layer.rewritten:
            decision = f"rank {layer.rank}" + (f" ({layer.form})" if layer.form != "concat" else "")
            macs = f"{human(layer.macs_before)}→{human(layer.macs_after)}"
            params = f"{human(layer.params_before)}→{human(layer.params_after)}"
            ratio = _fmt_ratio(_ratio(layer.macs_per_pixel_after, layer.macs_per_pixel_before))
            err = f"{layer.weight_error:.3f}" if layer.weight_error is not None else ""
        else:
            decision = f"[dim]skip: {layer.reason}[/dim]"
            macs = human(layer.macs_before)
            params = human(layer.params_before)
            ratio = ""
            err = ""
        table.add_row(layer.node or "(unnamed)", channels, kernel, str(layer.group), decision, macs, ratio, params, err)
    console.print(table)

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
            f"({_fmt_ratio(totals.macs_ratio)}); eligible convs: {human(totals.eligible_macs_before)} → "
            f"{human(totals.eligible_macs_after)} ({_fmt_ratio(totals.eligible_macs_ratio)}). "
            f"Conv params: {human(totals.params_before)} → {human(totals.params_after)}."
        )
    if report.passes:
        steps = ", ".join(f"{p['name']} ({p['changes']} changes, {p['seconds']:.2f}s)" for p in report.passes)
        console.print(f"Passes: {steps}.")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    render_verification(report.verification, console)


def render_verification(verification: VerificationResult | None, console: Console) -> None:
    if verification is None or not verification.ran:
        console.print("Verification: not run.")
        return
    if verification.atol is None and verification.rtol is None:
        tolerance = "no tolerance set (shapes, dtypes and finiteness only)"
    else:
        tolerance = f"atol={verification.atol or 0:g}, rtol={verification.rtol or 0:g}"
    verdict = "[green]PASSED[/green]" if verification.passed else "[red]FAILED[/red]"
    console.print(
        f"Verification in onnxruntime: {verdict} on {verification.samples} {verification.inputs} "
        f"sample(s); {tolerance}."
    )
    for out in verification.outputs:
        console.print(
            f"  {out.name}: max_abs={out.max_abs:.3g} mean_abs={out.mean_abs:.3g} max_rel={out.max_rel:.3g} "
            f"cosine={out.cosine:.6f}; would pass with atol>={out.min_atol:.3g} or rtol>={out.min_rtol:.3g}"
        )
    for problem in verification.problems:
        console.print(f"  [red]{problem}[/red]")


def _fmt_ratio(ratio: float | None) -> str:
    return "?" if ratio is None else f"{ratio:.3f}"
