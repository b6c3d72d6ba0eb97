"""The plan: one plain record per convolution, saying what happens to it and why.

``decompose_conv`` fills one :class:`LayerPlan` per Conv-like node of the
original model (subgraphs included). The report, the dry run and the savings
table all read these records; nothing else carries per-layer decisions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

REWRITTEN = "rewritten"
SKIPPED = "skipped"

# Emission forms, all computing the same function:
# "concat": r multiplier-1 depthwise convs + Concat + one pointwise conv (rank 1: no Concat);
# "multiplier": one depthwise conv of depth multiplier r (channel m·r + j), then the pointwise conv;
# "branches": r (depthwise -> pointwise) branches added by one Sum.
FORM_CONCAT = "concat"
FORM_MULTIPLIER = "multiplier"
FORM_BRANCHES = "branches"


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
    fit_seconds: float | None = None
    output: str = ""  # the conv's output tensor: a stable key even for unnamed nodes
    # Estimated normalised output error (NMSE) at ranks 1..full, and where the estimate comes from
    # ("weights": kernel spectrum, i.e. white inputs; "calibration": fitted on data; "evaluation": task score drop).
    error_at_rank: list[float] | None = None
    error_source: str | None = None
    # Measured in onnxruntime (conv alone, at its input shape, median ms), when latency-aware.
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    full_rank: int | None = None
    eligible: bool = False
    graph: str = "main"
    notes: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> bool:
        return self.status == REWRITTEN

    def to_dict(self) -> dict:
        return asdict(self)


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


def decisions_from_document(document) -> tuple[dict[str, int | None], dict[str, str], dict[str, str]]:
    """Per-conv ranks (None: skip), skip reasons and emission forms from a saved plan; ValueError if malformed."""
    if not isinstance(document, dict) or document.get("schema") != PLAN_SCHEMA:
        raise ValueError(f"not a dsrewrite plan (expected schema {PLAN_SCHEMA!r})")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ValueError("plan has no 'layers' list")
    ranks: dict[str, int | None] = {}
    reasons: dict[str, str] = {}
    forms: dict[str, str] = {}
    for entry in layers:
        if not isinstance(entry, dict) or not isinstance(entry.get("output"), str):
            raise ValueError("every plan layer needs an 'output' tensor name")
        key, rank = entry["output"], entry.get("rank")
        if entry.get("status") == REWRITTEN:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"plan layer {key!r}: rank must be a positive integer, not {rank!r}")
            ranks[key] = rank
            form = entry.get("form")
            if form is not None:
                if form not in (FORM_CONCAT, FORM_MULTIPLIER, FORM_BRANCHES):
                    raise ValueError(f"plan layer {key!r}: unknown form {form!r}")
                forms[key] = form
        else:
            ranks[key] = None
            reasons[key] = f"skipped by the plan: {entry.get('reason') or 'no reason given'}"
    return ranks, reasons, forms
