"""The plan: one plain record per convolution, saying what happens to it and why.

``analyse_convs`` fills one :class:`LayerPlan` per Conv-like node (subgraphs
included): its shape, costs, eligibility and error curve. A decision strategy
(``dsrewrite.decide``) answers with one :class:`Decision` per eligible conv;
:func:`dsrewrite.decide.apply_decisions` writes them into the plans, the fit
adds its figures, and ``decompose_conv`` emits exactly what the plans say. The
report, the dry run and ``--plan-out`` all read these records.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

REWRITTEN = "rewritten"
SKIPPED = "skipped"

# The notes a fit writes into a plan (``stages.record_fits``), which a conv left alone afterwards drops
# (``output_guard``): the linear fit's reason for not going further, and the fit at a following depthwise conv.
LINEAR_FIT_NOTE = "linear fit: "
THROUGH_FIT_NOTE = "fitted at the output of the depthwise conv that follows"


def is_fit_note(note: str) -> bool:
    return note.startswith((LINEAR_FIT_NOTE, THROUGH_FIT_NOTE))


# Emission forms, all computing the same function:
# "concat": r multiplier-1 depthwise convs + Concat + one pointwise conv (rank 1: no Concat);
# "multiplier": one depthwise conv of depth multiplier r (channel m·r + j), then the pointwise conv;
# "branches": r (depthwise -> pointwise) branches added by a chain of Adds (onnxruntime fuses each into its conv).
FORM_CONCAT = "concat"
FORM_MULTIPLIER = "multiplier"
FORM_BRANCHES = "branches"
# Not another way to compute the same function: the input-projected rewrite (``dsrewrite.projection``), tied
# weights fitted to data, offered to convs with few input channels after the allocation (``decide.offer_projection``).
FORM_PROJECTED = "projected"


def valid_forms(rank: int, group: int) -> list[str]:
    """The forms that can express a rank-``rank`` rewrite of a conv with ``group`` groups.

    The concat order (j·M + m) interleaves groups, so a grouped pointwise conv cannot read it.
    """
    if rank == 1:
        return [FORM_CONCAT]
    forms = [FORM_MULTIPLIER, FORM_BRANCHES]
    return [FORM_CONCAT] + forms if group == 1 else forms


def default_form(rank: int, group: int) -> str:
    return valid_forms(rank, group)[0]


@dataclass
class ConvAnalysis:
    """What the analysis knows of an eligible conv beyond the reported fields (never reported itself)."""

    kernel_errors: list[float]  # relative Frobenius error of the data-free factorisation at ranks 0..full
    kernel_size: int
    output_pixels: int | None  # output positions times batch; None when a dim is unknown
    has_bias: bool
    # The per-channel SVD itself (a lowrank.ChannelSpectra), kept while the analysis' memory budget allows, so
    # emission (and every timing candidate) factorises without a second SVD; dropped by the fit stage for the convs it fits.
    spectra: object | None = None


@dataclass
class LayerPlan:
    node: str
    op: str
    status: str
    reason: str | None
    rank: int | None
    form: str | None
    kernel: list[int] | None
    in_channels: int | None
    out_channels: int | None
    group: int
    macs_before: int | None
    macs_after: int | None
    params_before: int | None
    params_after: int | None
    macs_per_pixel_before: int | None = None
    macs_per_pixel_after: int | None = None
    weight_error: float | None = None
    output_error: float | None = None  # NMSE vs the original layer output on calibration data
    output_error_data_free: float | None = None  # the same for the plain SVD factors, for comparison
    fit: str = "data-free"  # how the weights were obtained
    # With calibration: the activation the conv's output feeds (its graph pattern), which output the kept fit
    # matches ("activated", "linear", or "after-depthwise": the output of the depthwise conv it feeds linearly, where
    # output_error is then measured), and the activated output's NMSE on the fit's sample for the factors used and
    # for the linear fit.
    activation: str | None = None
    fit_target: str | None = None
    activated_error: float | None = None
    activated_error_linear: float | None = None
    fit_seconds: float | None = None
    output: str = ""  # the conv's output tensor: a stable key even for unnamed nodes
    # Estimated normalised output error (NMSE) at ranks 1..full, and where the estimate comes from
    # ("weights": kernel spectrum, i.e. white inputs; "calibration": fitted on data; "evaluation": task score drop).
    error_at_rank: list[float] | None = None
    error_source: str | None = None
    # When the allocation read output-level errors (error_source "model outputs"): the layer-level curve it replaced,
    # and the output-level error of this conv alone at its decided rank.
    layer_error_at_rank: list[float] | None = None
    model_output_error: float | None = None
    # Measured in onnxruntime (conv alone, at its input shape, median ms), when latency-aware.
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    # Measured in the whole model (onnxruntime profiler, kernel time per run attributed to this conv), when latency-aware.
    in_model_before_ms: float | None = None
    in_model_after_ms: float | None = None
    full_rank: int | None = None
    # Convs with 2-4 input channels and calibration curves: the layer-level NMSE of the input-projected rewrite
    # at ranks 1..full (inf where it saves no MACs), and its 1×1 input mix's MACs per output pixel.
    projected_error_at_rank: list[float] | None = None
    projection_macs_per_pixel: int | None = None
    eligible: bool = False
    graph: str = "main"
    notes: list[str] = field(default_factory=list)
    analysis: ConvAnalysis | None = field(default=None, repr=False)  # eligible convs only; not reported

    @property
    def rewritten(self) -> bool:
        return self.status == REWRITTEN

    def macs_per_pixel_at(self, rank: int, form: str | None = None) -> int:
        """MACs per output pixel of this conv's rank-``rank`` rewrite (in ``form``: only the projected one differs)."""
        from .cost import projected_cost, separable_cost  # noqa: PLC0415 (plan stays importable alone)

        k = math.prod(self.kernel)
        if form == FORM_PROJECTED:
            return projected_cost(self.in_channels, self.out_channels, k, rank, self.projection_macs_per_pixel, None, False).macs_per_pixel
        return separable_cost(self.in_channels, self.out_channels, k, self.group, rank, None, False).macs_per_pixel

    def candidate_ranks(self, limit: int = 6) -> list[int]:
        """Up to ``limit`` estimated ranks that save MACs: every rank up to ``limit``, then 12, 16, 24, 32, 48, 64."""
        saving = [
            r
            for r, e in enumerate(self.error_at_rank or [], start=1)
            if math.isfinite(e) and self.macs_per_pixel_at(r) < self.macs_per_pixel_before
        ]
        ladder = [r for r in saving if r <= limit or r in (12, 16, 24, 32, 48, 64)]
        return ladder[:limit]

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["analysis"]
        return data


@dataclass
class Decision:
    """What to do with one eligible conv: a rank (None: leave it alone, with a reason) and an emission form.

    ``latency_ms``: (original conv, chosen rewrite or None) as measured in onnxruntime, when timed.
    """

    rank: int | None
    reason: str | None = None
    form: str | None = None
    latency_ms: tuple[float, float | None] | None = None
    replaces: "Decision | None" = None  # a projected decision: the separable one it replaced (the fallback)


@dataclass
class Decisions:
    """One :class:`Decision` per conv output; convs not named keep ``default_reason``."""

    layers: dict[str, Decision] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    default_reason: str = "no rank decided for this conv"

    @property
    def ranks(self) -> dict[str, int | None]:
        return {key: d.rank for key, d in self.layers.items()}


# -- saved plans ------------------------------------------------------------------------------

PLAN_SCHEMA = "dsrewrite.plan/1"


def plan_document(layers: list[LayerPlan], model: dict) -> dict:
    """The per-conv decisions as a JSON-able document (``--plan-out``)."""
    return {
        "schema": PLAN_SCHEMA,
        "model": model,
        "layers": [
            {
                "output": layer.output,
                "node": layer.node,
                "status": layer.status,
                "rank": layer.rank,
                "form": layer.form,
                "reason": layer.reason,
            }
            for layer in layers
        ],
    }


def decisions_from_document(document) -> Decisions:
    """The decisions of a saved plan: ranks, emission forms and skip reasons; ValueError if malformed."""
    if not isinstance(document, dict) or document.get("schema") != PLAN_SCHEMA:
        raise ValueError(f"not a dsrewrite plan (expected schema {PLAN_SCHEMA!r})")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ValueError("plan has no 'layers' list")
    decisions = Decisions(default_reason="not in the plan")
    for entry in layers:
        if not isinstance(entry, dict) or not isinstance(entry.get("output"), str):
            raise ValueError("every plan layer needs an 'output' tensor name")
        key, rank = entry["output"], entry.get("rank")
        if entry.get("status") == REWRITTEN:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"plan layer {key!r}: rank must be a positive integer, not {rank!r}")
            form = entry.get("form")
            if form is not None and form not in (FORM_CONCAT, FORM_MULTIPLIER, FORM_BRANCHES, FORM_PROJECTED):
                raise ValueError(f"plan layer {key!r}: unknown form {form!r}")
            decisions.layers[key] = Decision(rank, form=form)
        else:
            decisions.layers[key] = Decision(None, f"skipped by the plan: {entry.get('reason') or 'no reason given'}")
    return decisions
