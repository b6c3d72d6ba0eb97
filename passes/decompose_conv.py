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
pointwise conv. Which form runs fastest is a measurement (``dsrewrite.measure``);
the plan carries the choice.

This pass only emits. What it emits comes from, in order of precedence:

* ``plans``: analysed and decided plans (``analyse_convs`` + ``dsrewrite.decide``),
  with ``fitted`` factors for the convs fitted to calibration data. This is how
  ``dsrewrite.rewrite`` runs it, after its own stages decided;
* ``decisions``: a rank and form per conv output, applied to a fresh analysis;
* ``options``: one uniform rank, ``full``, or the data-free ``auto`` rule.

Every Conv-like node gets a :class:`~dsrewrite.plan.LayerPlan` (its facts); the
ones left alone carry the reason. The result passes the ONNX checker (``ensures``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsrewrite import lowrank
from dsrewrite.budget import DEFAULT_MAX_ERROR
from dsrewrite.decide import DataFreeAuto, UniformRank, apply_decisions
from dsrewrite.graph import CONV_OPS, ConvSpec, NameAllocator, iter_graphs
from dsrewrite.pipeline import ONNX_CHECKER, Change, PassBase, PassContext, PassResult, Skip
from dsrewrite.plan import FORM_BRANCHES, FORM_MULTIPLIER, FORM_PROJECTED, Decisions, LayerPlan
from dsrewrite.projection import ProjectedFactors, data_free_projected

from .analyse_convs import AnalyseConvs

log = logging.getLogger(__name__)

__all__ = ["CONV_OPS", "DecomposeConv", "DecomposeOptions", "emitted_factors"]


@dataclass(frozen=True)
class DecomposeOptions:
    """``rank``: an int >= 1, ``"full"`` (exact) or ``"auto"`` (smallest rank within ``max_error``)."""

    rank: int | str = "auto"
    max_error: float = DEFAULT_MAX_ERROR
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


class DecomposeConv(PassBase):
    name = "decompose_conv"
    ensures = (ONNX_CHECKER,)

    def __init__(
        self,
        options: DecomposeOptions | None = None,
        *,
        plans: Sequence[LayerPlan] | None = None,
        decisions: Decisions | None = None,
        fitted: Mapping | None = None,
        **kwargs,
    ):
        self.options = options or DecomposeOptions(**kwargs)
        self.plans = None if plans is None else list(plans)
        self.decisions = decisions
        # Factors fitted to calibration data (dsrewrite.distill), keyed by conv output tensor.
        self.fitted = dict(fitted or {})
        # After a run: the names of the nodes each conv became, keyed by conv output (to attribute profiles).
        self.emitted: dict[str, list[str]] = {}

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        plans = self.plans if self.plans is not None else self._decide(graph, context)
        result = PassResult(self.name, facts=list(plans))
        by_output = {p.output: p for p in plans}
        names = NameAllocator(graph)
        for g in list(iter_graphs(graph)):
            for node in [n for n in g.nodes if n.op in CONV_OPS and n.outputs]:
                output = node.outputs[0].name
                plan = by_output.get(output)
                if plan is None:
                    continue
                if not plan.rewritten:
                    result.skips.append(Skip(node.name, plan.reason or ""))
                    continue
                fitted = self.fitted.get(output)
                spec = ConvSpec.from_node(node, g, context.shapes)
                if plan.form == FORM_PROJECTED:
                    projected = getattr(fitted, "projected", None)
                    if projected is not None and projected.rank == plan.rank:
                        new_nodes = _emit_projected(spec, projected, names, fitted.bias)
                    else:  # not fitted (a saved plan without calibration data): white-input factors
                        new_nodes = _emit_projected(spec, data_free_projected(spec.weight, plan.rank), names, None)
                else:
                    if fitted is not None and fitted.factors.rank == plan.rank:
                        factors, bias = fitted.factors, fitted.bias
                    else:
                        kept = plan.analysis.spectra if plan.analysis is not None else None
                        spectra = kept if kept is not None else lowrank.channel_spectra(spec.weight, spec.group)
                        factors, bias = lowrank.factorize(spectra, plan.rank), None
                    new_nodes = _emit(spec, factors, plan.form, names, bias=bias)
                self.emitted[output] = [n.name for n in new_nodes]
                result.changes.append(Change(node.name, f"rank {plan.rank} ({plan.form})"))
        return result

    def _decide(self, graph: gs.Graph, context: PassContext) -> list[LayerPlan]:
        """Standalone use: analyse, then decide by the given decisions or the options' rule."""
        plans = AnalyseConvs(self.options.include, self.options.exclude).run(graph, context).facts
        if self.decisions is not None:
            decisions = self.decisions
        elif self.options.rank == "auto":
            decisions = DataFreeAuto(self.options.max_error).decide(plans)
        else:
            decisions = UniformRank(self.options.rank).decide(plans)
        apply_decisions(plans, decisions)
        return plans


# -- emission -------------------------------------------------------------------------------


def _emit(
    spec: ConvSpec, factors: lowrank.SeparableFactors, form: str, names: NameAllocator, bias: np.ndarray | None = None
) -> list[gs.Node]:
    """Replace ``spec.node`` in its graph by the separable subgraph, in place; return the new nodes.

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

    dw_attrs = _spatial_attrs(spec, group=m)

    new_nodes: list[gs.Node] = []
    if form == FORM_BRANCHES:
        _emit_branches(spec, factors, names, base, x, y, dw_attrs, bias, bias_tensor, new_nodes)
        graph.nodes[position : position + 1] = new_nodes
        return new_nodes
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
    pw_inputs = [mid, gs.Constant(names.fresh(f"{base}/pw/W"), pw_weight), *_bias_input(names, base, bias, bias_tensor, dtype)]
    pw_attrs = {"group": spec.group, "kernel_shape": [1] * len(kernel)}
    new_nodes.append(gs.Node("Conv", names.fresh(f"{base}/pw"), pw_attrs, pw_inputs, [y]))

    graph.nodes[position : position + 1] = new_nodes
    log.debug("rewrote %s at rank %d (%s)", node.name, r, form)
    return new_nodes


def _emit_projected(spec: ConvSpec, factors: ProjectedFactors, names: NameAllocator, bias: np.ndarray | None) -> list[gs.Node]:
    """Replace ``spec.node`` by the input-projected chain (``dsrewrite.projection``), in place; return the new nodes:
    a 1×1 conv mixing the inputs into one channel, a conv of ``r`` filters on it with the original's geometry, and
    the pointwise conv (with ``bias``, else the original bias tensor)."""
    node, graph = spec.node, spec.graph
    base = node.name or "conv"
    dtype = spec.weight.dtype
    kernel = list(spec.kernel_shape)
    ones = [1] * len(kernel)
    x, y = node.inputs[0], node.outputs[0]
    bias_tensor = node.inputs[2] if spec.has_bias else None
    position = graph.nodes.index(node)
    node.inputs.clear()
    node.outputs.clear()
    r, n = factors.rank, factors.pointwise.shape[0]
    mixed = gs.Variable(names.fresh(f"{base}/mix_out"))
    filtered = gs.Variable(names.fresh(f"{base}/dw_out"))
    mix_w = gs.Constant(names.fresh(f"{base}/mix/W"), factors.projection.reshape(1, -1, *ones).astype(dtype))
    dw_w = gs.Constant(names.fresh(f"{base}/dw/W"), factors.depthwise.reshape(r, 1, *kernel).astype(dtype))
    pw_w = gs.Constant(names.fresh(f"{base}/pw/W"), factors.pointwise.reshape(n, r, *ones).astype(dtype))
    pw_inputs = [filtered, pw_w, *_bias_input(names, base, bias, bias_tensor, dtype)]
    new_nodes = [
        gs.Node("Conv", names.fresh(f"{base}/mix"), {"group": 1, "kernel_shape": ones}, [x, mix_w], [mixed]),
        _conv(names.fresh(f"{base}/dw"), mixed, dw_w, filtered, _spatial_attrs(spec, group=1)),
        gs.Node("Conv", names.fresh(f"{base}/pw"), {"group": 1, "kernel_shape": ones}, pw_inputs, [y]),
    ]
    graph.nodes[position : position + 1] = new_nodes
    log.debug("rewrote %s at rank %d (projected)", node.name, r)
    return new_nodes


def _emit_branches(spec, factors, names, base, x, y, dw_attrs, bias, bias_tensor, new_nodes) -> None:
    """r (depthwise j -> pointwise j) branches, accumulated by a chain of two-input Adds; the bias rides on the
    first pointwise conv.

    A chain, not one r-input Sum: onnxruntime fuses each Add into the pointwise conv that produces it (NCHWc conv
    with a summand) and an activation after the last one, where a Sum stays a separate node with layout reorders
    around every input (measured on a ResNet-style CRNN: 0.2 ms of a 12 ms run for seven convs at ranks 2–5).
    """
    dtype = spec.weight.dtype
    m, r, _k = factors.depthwise.shape
    n, mg, _ = factors.pointwise.shape
    kernel = list(spec.kernel_shape)
    pw_attrs = {"group": spec.group, "kernel_shape": [1] * len(kernel)}
    total = None
    for j in range(r):
        dw_out = gs.Variable(names.fresh(f"{base}/dw{j}_out"))
        dw_weight = factors.depthwise[:, j, :].reshape(m, 1, *kernel).astype(dtype)
        new_nodes.append(_conv(names.fresh(f"{base}/dw{j}"), x, gs.Constant(names.fresh(f"{base}/dw{j}/W"), dw_weight), dw_out, dw_attrs))
        pw_weight = factors.pointwise[:, :, j].reshape(n, mg, *([1] * len(kernel))).astype(dtype)
        inputs = [dw_out, gs.Constant(names.fresh(f"{base}/pw{j}/W"), pw_weight)]
        if j == 0:
            inputs += _bias_input(names, base, bias, bias_tensor, dtype)
        out = y if r == 1 else gs.Variable(names.fresh(f"{base}/pw{j}_out"))
        new_nodes.append(gs.Node("Conv", names.fresh(f"{base}/pw{j}"), dict(pw_attrs), inputs, [out]))
        if j == 0:
            total = out
            continue
        # The new branch first: onnxruntime fuses the Add into the conv that computes its first input.
        acc = y if j == r - 1 else gs.Variable(names.fresh(f"{base}/sum{j}_out"))
        new_nodes.append(gs.Node("Add", names.fresh(f"{base}/add{j}"), {}, [out, total], [acc]))
        total = acc


def emitted_factors(
    nodes: Sequence[onnx.NodeProto], weights: Mapping[str, np.ndarray], form: str
) -> tuple[lowrank.SeparableFactors | ProjectedFactors, np.ndarray | None]:
    """The inverse of emission: the factors and pointwise bias that one conv's emitted ``nodes`` (in emission
    order, as ``DecomposeConv.emitted`` names them) hold in ``weights`` (initializers by name), e.g. after
    fine-tuning trained them. The bias is None when the pointwise conv has none."""
    convs = [n for n in nodes if n.op_type == "Conv"]

    def weight(node: onnx.NodeProto) -> np.ndarray:
        return np.asarray(weights[node.input[1]], dtype=np.float64)

    def bias(node: onnx.NodeProto) -> np.ndarray | None:
        name = node.input[2] if len(node.input) > 2 else ""
        return np.asarray(weights[name], dtype=np.float64) if name else None

    def group(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    if form == FORM_PROJECTED:
        mix, dw, pw = convs
        w = weight(dw)
        r, kernel = w.shape[0], tuple(w.shape[2:])
        factors = ProjectedFactors(projection=weight(mix).reshape(-1), depthwise=w.reshape(r, -1),
                                   pointwise=weight(pw).reshape(-1, r), kernel_shape=kernel)  # fmt: skip
        return factors, bias(pw)
    if form == FORM_BRANCHES:
        dws, pws = convs[0::2], convs[1::2]
    else:  # concat (r multiplier-1 depthwise convs, rank-major) or one multiplier-r depthwise conv
        dws, pws = convs[:-1], convs[-1:]
    first = weight(dws[0])
    m, kernel = group(dws[0]), tuple(first.shape[2:])
    g = group(pws[0])
    if form == FORM_BRANCHES:
        depthwise = np.stack([weight(d).reshape(m, -1) for d in dws], axis=1)
        pointwise = np.stack([weight(p).reshape(weight(p).shape[0], -1) for p in pws], axis=2)
    elif form == FORM_MULTIPLIER:
        r = first.shape[0] // m
        depthwise = first.reshape(m, r, -1)
        pw = weight(pws[0])
        pointwise = pw.reshape(pw.shape[0], -1, r)
    else:
        r = len(dws)
        depthwise = np.stack([weight(d).reshape(m, -1) for d in dws], axis=1)
        pw = weight(pws[0])
        pointwise = pw.reshape(pw.shape[0], r, -1).transpose(0, 2, 1)
    factors = lowrank.SeparableFactors(depthwise=depthwise, pointwise=np.ascontiguousarray(pointwise), groups=g,
                                       kernel_shape=kernel)  # fmt: skip
    return factors, bias(pws[0])


def _spatial_attrs(spec: ConvSpec, group: int) -> dict:
    """The attributes of the conv that carries the original's spatial work: its kernel, strides, dilations and
    padding, at ``group``."""
    geometry = spec.geometry
    attrs: dict = {"group": group, "kernel_shape": list(spec.kernel_shape), "strides": list(geometry.strides),
                   "dilations": list(geometry.dilations)}  # fmt: skip
    if geometry.auto_pad != "NOTSET":
        attrs["auto_pad"] = geometry.auto_pad
    else:
        attrs["pads"] = list(geometry.pads)
    return attrs


def _bias_input(names: NameAllocator, base: str, bias: np.ndarray | None, bias_tensor: gs.Tensor | None, dtype) -> list[gs.Tensor]:
    """The pointwise conv's bias input: the refitted ``bias`` as a new constant, else the original bias tensor, else none."""
    if bias is not None:
        return [gs.Constant(names.fresh(f"{base}/pw/B"), np.asarray(bias).astype(dtype))]
    return [] if bias_tensor is None else [bias_tensor]


def _conv(name: str, x: gs.Tensor, w: gs.Constant, y: gs.Variable, attrs: dict) -> gs.Node:
    return gs.Node("Conv", name, dict(attrs), [x, w], [y])
