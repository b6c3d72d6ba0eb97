"""decompose_conv: standard Conv -> depthwise Conv(s) (+ Concat) + pointwise Conv.

Before::

    x ─ Conv(W: N×M/g×k, b, group=g, strides, pads, dilations) ─ y

After, rank 1::

    x ─ Conv(D0: M×1×k, group=M, strides, pads, dilations) ─ Conv(P: N×M/g×1, b, group=g) ─ y

After, rank r > 1 and g = 1 ("concat" form)::

    x ─┬─ Conv(D0, group=M, ...) ─┐
       ├─ ...                     ├─ Concat(axis=1) ─ Conv(P: N×rM×1, b) ─ y
       └─ Conv(D{r-1}, group=M)  ─┘

After, rank r > 1 ("multiplier" form; the default when g > 1)::

    x ─ Conv(D: rM×1×k, group=M, ...) ─ Conv(P: N×rM/g×1, b, group=g) ─ y

After, rank r > 1 ("branches" form)::

    x ─┬─ Conv(D0, group=M) ─ Conv(P0: N×M/g×1, b, group=g) ─┐
       ├─ ...                                               ├─ Sum ─ y
       └─ Conv(D{r-1}, group=M) ─ Conv(P{r-1}, group=g)   ─┘

Math (``dsrewrite.lowrank``): per input channel ``m``, the ``N/g × K`` slice
``W[:, m]`` is factorised by SVD; depthwise filter ``j`` of channel ``m`` is
``√s_j v_j`` and the pointwise column is ``√s_j u_j``. At ``r = min(N/g, K)``
the rewrite is exact.

The concat order is rank-major (channel ``j·M + m``), which mixes groups, so
a grouped conv at rank > 1 uses one depthwise conv of depth multiplier ``r``
(channel ``m·r + j``): each group's channels stay contiguous for the grouped
pointwise conv. Which form runs fastest is a measurement (``dsrewrite.latency``);
``DecomposeOptions.layer_forms`` carries the choice.

Every Conv-like node gets a :class:`~dsrewrite.plan.LayerPlan`; the ones left
alone carry the reason.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from dsrewrite import lowrank
from dsrewrite.budget import DEFAULT_MAX_ERROR, choose_auto_rank
from dsrewrite.cost import conv_cost, separable_cost
from dsrewrite.graph import ConvSpec, NameAllocator, consumers, is_graph_output, iter_graphs
from dsrewrite.plan import FORM_BRANCHES, FORM_MULTIPLIER, REWRITTEN, SKIPPED, LayerPlan, default_form, valid_forms
from dsrewrite.pipeline import Change, PassContext, PassResult, Skip

log = logging.getLogger(__name__)

CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")


@dataclass(frozen=True)
class DecomposeOptions:
    """``rank``: an int >= 1, ``"full"`` (exact) or ``"auto"`` (smallest rank within ``max_error``)."""

    rank: int | str = "auto"
    max_error: float = DEFAULT_MAX_ERROR
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    apply: bool = True  # False: plan only (dry run), leave the graph untouched
    # Per-conv decisions made elsewhere (a MAC budget, a saved plan), keyed by conv output tensor:
    # a rank, or None to leave the conv alone with the reason in `layer_reasons`. They override `rank`.
    layer_ranks: Mapping[str, int | None] | None = None
    layer_reasons: Mapping[str, str] | None = None
    layer_forms: Mapping[str, str] | None = None  # emission form per conv (see dsrewrite.plan), e.g. the measured fastest


class DecomposeConv:
    name = "decompose_conv"

    def __init__(self, options: DecomposeOptions | None = None, *, fitted: Mapping | None = None, **kwargs):
        self.options = options or DecomposeOptions(**kwargs)
        # Factors fitted to calibration data (dsrewrite.distill), keyed by conv output tensor.
        self.fitted = dict(fitted or {})

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        result = PassResult(self.name)
        names = NameAllocator(graph)
        for index, g in enumerate(list(iter_graphs(graph))):
            graph_label = "main" if index == 0 else (g.name or f"subgraph{index}")
            for node in [n for n in g.nodes if n.op in CONV_OPS]:
                spec = ConvSpec.from_node(node, g, context.shapes) if node.op == "Conv" else None
                plan, factors = self._plan(node, spec, graph)
                plan.graph = graph_label
                result.facts.append(plan)
                if plan.status == SKIPPED:
                    result.skips.append(Skip(node.name, plan.reason or ""))
                    continue
                if self.options.apply:
                    fitted = self.fitted.get(plan.output)
                    _emit(spec, factors, plan.form, names, bias=None if fitted is None else fitted.bias)
                    result.changes.append(Change(node.name, f"rank {plan.rank} ({plan.form})"))
        return result

    # -- planning ---------------------------------------------------------------------------

    def _plan(self, node: gs.Node, spec: ConvSpec | None, root: gs.Graph):
        plan = _base_plan(node, spec)
        reason = self._ineligible_reason(node, spec, root)
        if reason is not None:
            plan.reason = reason
            return plan, None
        plan.eligible = True
        spectra = lowrank.channel_spectra(spec.weight, spec.group)
        plan.full_rank = spectra.full_rank
        errors = lowrank.relative_errors(spectra)
        plan.error_at_rank = [float(e) ** 2 for e in errors[1:]]
        plan.error_source = "weights"
        rank, reason = self._choose_rank(spec, spectra, errors, plan.output)
        if rank is None:
            plan.reason = reason
            return plan, None
        after = separable_cost(
            spec.in_channels, spec.out_channels, spec.kernel_size, spec.group, rank, spec.output_pixels(), spec.has_bias
        )
        plan.status = REWRITTEN
        plan.rank = rank
        forms = valid_forms(rank, spec.group)
        wanted = (self.options.layer_forms or {}).get(plan.output)
        plan.form = wanted if wanted in forms else default_form(rank, spec.group)
        plan.macs_after = after.macs
        plan.macs_per_pixel_after = after.macs_per_pixel
        plan.params_after = after.params
        plan.weight_error = float(errors[rank])
        if rank == spectra.full_rank and after.macs_per_pixel >= plan.macs_per_pixel_before:
            plan.notes.append("full rank is exact but saves no MACs")
        fitted = self.fitted.get(plan.output)
        if fitted is not None and fitted.factors.rank == rank:
            plan.weight_error = fitted.weight_error
            plan.output_error = fitted.output_error
            plan.output_error_data_free = fitted.output_error_data_free
            plan.fit = fitted.method
            plan.fit_seconds = fitted.seconds
            return plan, fitted.factors
        return plan, lowrank.factorize(spectra, rank)

    def _ineligible_reason(self, node: gs.Node, spec: ConvSpec | None, root: gs.Graph) -> str | None:
        if node.op != "Conv":
            return f"quantized conv ({node.op}): integer weights are not factorised"
        selection = _selection_reason(node.name, self.options.include, self.options.exclude)
        if selection:
            return selection
        if spec.weight is None:
            return "weights computed at run time"
        weight_tensor = node.inputs[1]
        users = len(consumers(weight_tensor))
        if users > 1:
            return f"weights shared by {users} nodes"
        if is_graph_output(weight_tensor, root):
            return "weights are also a graph output"
        if not spec.is_float:
            return f"non-float weights ({spec.weight.dtype})"
        if spec.weight.ndim < 3:
            return f"weight of rank {spec.weight.ndim} has no spatial kernel"
        if not np.all(np.isfinite(spec.weight)):
            return "weights contain NaN or Inf"
        if spec.has_bias and spec.bias is not None and not np.all(np.isfinite(spec.bias)):
            return "bias contains NaN or Inf"
        if spec.kernel_size == 1:
            return "1x1 kernel: already pointwise"
        if spec.weight_shape[1] == 1:
            return "already depthwise (one input channel per group)"
        return None

    def _choose_rank(self, spec: ConvSpec, spectra: lowrank.ChannelSpectra, errors: np.ndarray, key: str):
        full = spectra.full_rank
        if self.options.layer_ranks is not None:
            if key in self.options.layer_ranks and self.options.layer_ranks[key] is not None:
                return min(int(self.options.layer_ranks[key]), full), None
            reasons = self.options.layer_reasons or {}
            return None, reasons.get(key, "no rank decided for this conv")
        before = spec.weight_shape[0] * spec.weight_shape[1] * spec.kernel_size
        per_pixel = [0] + [
            separable_cost(spec.in_channels, spec.out_channels, spec.kernel_size, spec.group, r, None, False).macs_per_pixel
            for r in range(1, full + 1)
        ]
        rank = self.options.rank
        if rank == "full":
            return full, None
        if rank == "auto":
            choice = choose_auto_rank(errors, per_pixel, before, self.options.max_error)
            return choice.rank, choice.reason
        r = min(int(rank), full)
        if per_pixel[r] >= before:
            return None, f"rank {r} saves no MACs ({per_pixel[r] / before:.2f}x the original)"
        return r, None


def _base_plan(node: gs.Node, spec: ConvSpec | None) -> LayerPlan:
    """A 'skipped' plan with the layer's shape facts filled in."""
    if spec is None or spec.weight_shape is None or spec.kernel_size is None:
        return LayerPlan(
            node=node.name, op=node.op, output=node.outputs[0].name if node.outputs else "", status=SKIPPED, reason=None, rank=None, form=None,
            kernel=list(spec.kernel_shape) if spec and spec.kernel_shape else None,
            in_channels=None, out_channels=None, group=int(node.attrs.get("group", 1)),
            macs_before=None, macs_after=None, params_before=None, params_after=None,
        )  # fmt: skip
    before = conv_cost(
        spec.in_channels, spec.out_channels, spec.kernel_size, spec.group, spec.output_pixels(), spec.has_bias
    )
    return LayerPlan(
        node=node.name, op=node.op, output=node.outputs[0].name if node.outputs else "", status=SKIPPED, reason=None, rank=None, form=None,
        kernel=list(spec.kernel_shape), in_channels=spec.in_channels, out_channels=spec.out_channels,
        group=spec.group, macs_before=before.macs, macs_after=before.macs,
        params_before=before.params, params_after=before.params,
        macs_per_pixel_before=before.macs_per_pixel, macs_per_pixel_after=before.macs_per_pixel,
    )  # fmt: skip


def _selection_reason(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> str | None:
    if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return "not selected by --include"
    for pattern in exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by --exclude {pattern}"
    return None


# -- emission -------------------------------------------------------------------------------


def _emit(
    spec: ConvSpec, factors: lowrank.SeparableFactors, form: str, names: NameAllocator, bias: np.ndarray | None = None
) -> None:
    """Replace ``spec.node`` in its graph by the separable subgraph, in place.

    ``bias``: a refitted bias for the pointwise conv; by default the original bias tensor is reused.
    """
    node, graph = spec.node, spec.graph
    base = node.name or "conv"
    dtype = spec.weight.dtype
    m, r, _k = factors.depthwise.shape
    n, mg, _ = factors.pointwise.shape
    kernel = list(spec.kernel_shape)
    x = node.inputs[0]
    y = node.outputs[0]
    bias_tensor = node.inputs[2] if spec.has_bias else None  # the original bias tensor, constant or not
    # Detach the original node first; its weight (initializer or Constant) is left for cleanup.
    position = graph.nodes.index(node)
    node.inputs.clear()
    node.outputs.clear()

    dw_attrs: dict = {"group": m, "kernel_shape": kernel, "strides": list(spec.strides), "dilations": list(spec.dilations)}
    if spec.auto_pad != "NOTSET":
        dw_attrs["auto_pad"] = spec.auto_pad
    else:
        dw_attrs["pads"] = list(spec.pads)

    new_nodes: list[gs.Node] = []
    if form == FORM_BRANCHES:
        _emit_branches(spec, factors, names, base, x, y, dw_attrs, bias, bias_tensor, new_nodes)
        graph.nodes[position : position + 1] = new_nodes
        return
    if form == FORM_MULTIPLIER:
        # Channel m·r + j of one multiplier-r depthwise conv.
        dw_weight = factors.depthwise.reshape(m * r, 1, *kernel).astype(dtype)
        pw_weight = factors.pointwise.reshape(n, mg * r)
        mid = gs.Variable(names.fresh(f"{base}/dw_out"))
        new_nodes.append(_conv(names.fresh(f"{base}/dw"), x, gs.Constant(names.fresh(f"{base}/dw/W"), dw_weight), mid, dw_attrs))
    else:
        # Channel j·M + m after the Concat of r multiplier-1 depthwise convs.
        pw_weight = factors.pointwise.transpose(0, 2, 1).reshape(n, r * mg)
        outputs = []
        for j in range(r):
            dw_weight = factors.depthwise[:, j, :].reshape(m, 1, *kernel).astype(dtype)
            out = gs.Variable(names.fresh(f"{base}/dw{j}_out"))
            w = gs.Constant(names.fresh(f"{base}/dw{j}/W"), dw_weight)
            new_nodes.append(_conv(names.fresh(f"{base}/dw{j}"), x, w, out, dw_attrs))
            outputs.append(out)
        if r == 1:
            mid = outputs[0]
        else:
            mid = gs.Variable(names.fresh(f"{base}/concat_out"))
            new_nodes.append(gs.Node("Concat", names.fresh(f"{base}/concat"), {"axis": 1}, outputs, [mid]))

    pw_weight = pw_weight.reshape(n, -1, *([1] * len(kernel))).astype(dtype)
    pw_inputs = [mid, gs.Constant(names.fresh(f"{base}/pw/W"), pw_weight)]
    if bias is not None:
        pw_inputs.append(gs.Constant(names.fresh(f"{base}/pw/B"), np.asarray(bias).astype(dtype)))
    elif bias_tensor is not None:
        pw_inputs.append(bias_tensor)
    pw_attrs = {"group": spec.group, "kernel_shape": [1] * len(kernel)}
    new_nodes.append(gs.Node("Conv", names.fresh(f"{base}/pw"), pw_attrs, pw_inputs, [y]))

    graph.nodes[position : position + 1] = new_nodes
    log.debug("rewrote %s at rank %d (%s)", node.name, r, form)


def _emit_branches(spec, factors, names, base, x, y, dw_attrs, bias, bias_tensor, new_nodes) -> None:
    """r (depthwise j -> pointwise j) branches, summed; the bias rides on the first pointwise conv."""
    dtype = spec.weight.dtype
    m, r, _k = factors.depthwise.shape
    n, mg, _ = factors.pointwise.shape
    kernel = list(spec.kernel_shape)
    pw_attrs = {"group": spec.group, "kernel_shape": [1] * len(kernel)}
    branch_outputs = []
    for j in range(r):
        dw_out = gs.Variable(names.fresh(f"{base}/dw{j}_out"))
        dw_weight = factors.depthwise[:, j, :].reshape(m, 1, *kernel).astype(dtype)
        new_nodes.append(_conv(names.fresh(f"{base}/dw{j}"), x, gs.Constant(names.fresh(f"{base}/dw{j}/W"), dw_weight), dw_out, dw_attrs))
        pw_weight = factors.pointwise[:, :, j].reshape(n, mg, *([1] * len(kernel))).astype(dtype)
        inputs = [dw_out, gs.Constant(names.fresh(f"{base}/pw{j}/W"), pw_weight)]
        if j == 0 and bias is not None:
            inputs.append(gs.Constant(names.fresh(f"{base}/pw/B"), np.asarray(bias).astype(dtype)))
        elif j == 0 and bias_tensor is not None:
            inputs.append(bias_tensor)
        out = gs.Variable(names.fresh(f"{base}/pw{j}_out"))
        new_nodes.append(gs.Node("Conv", names.fresh(f"{base}/pw{j}"), dict(pw_attrs), inputs, [out]))
        branch_outputs.append(out)
    new_nodes.append(gs.Node("Sum", names.fresh(f"{base}/sum"), {}, branch_outputs, [y]))


def _conv(name: str, x: gs.Tensor, w: gs.Constant, y: gs.Variable, attrs: dict) -> gs.Node:
    return gs.Node("Conv", name, dict(attrs), [x, w], [y])
