"""The plan: one plain record per convolution, saying what happens to it and why.

``decompose_conv`` fills one :class:`LayerPlan` per Conv-like node of the
original model (subgraphs included). The report, the dry run and the savings
table all read these records; nothing else carries per-layer decisions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

REWRITTEN = "rewritten"
SKIPPED = "skipped"

# Emission forms. "concat": r multiplier-1 depthwise convs + Concat + pointwise
# (rank 1: no Concat). "multiplier": one depthwise conv of depth multiplier r,
# whose channel order (m·r + j) keeps each group's channels contiguous, as a
# grouped pointwise conv needs.
FORM_CONCAT = "concat"
FORM_MULTIPLIER = "multiplier"


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
    full_rank: int | None = None
    eligible: bool = False
    graph: str = "main"
    notes: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> bool:
        return self.status == REWRITTEN

    def to_dict(self) -> dict:
        return asdict(self)
