"""analyse_convs: one LayerPlan per convolution, the graph left untouched (a read-only pass).

Before / after: the same graph. Facts: one :class:`~dsrewrite.plan.LayerPlan`
per Conv-like node (subgraphs included), with its shape, its MACs and
parameters at the analysed shapes, and either the reason it cannot be
rewritten or, for an eligible conv, its error curve.

Math (``dsrewrite.lowrank``): per input channel ``m`` the ``N/g × K`` slice
``W[:, m]`` has singular values ``s_1 ≥ s_2 ≥ …``; dropping all but ``r`` of
them leaves the relative Frobenius error ``√(Σ_{j>r} s_j² / Σ_j s_j²)`` over
all channels. Its square is the conv's normalised output error for white
inputs: the data-free error curve (``error_source = "weights"``) that the
decision strategies start from.
"""

from __future__ import annotations

import fnmatch
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_graphsurgeon as gs

from dsrewrite import lowrank
from dsrewrite.cores import available_cores
from dsrewrite.cost import conv_cost
from dsrewrite.graph import CONV_OPS, ConvSpec, consumers, is_graph_output, iter_graphs
from dsrewrite.pipeline import PassBase, PassContext, PassResult
from dsrewrite.projection import can_project
from dsrewrite.plan import SKIPPED, ConvAnalysis, LayerPlan



# The per-channel SVDs of all convs are kept for emission up to this many bytes (float64); past it they are
# recomputed when needed, so a model of huge convs does not hold its weights twice more in memory.
KEEP_SPECTRA_BYTES = 512 * 2**20


class AnalyseConvs(PassBase):
    name = "analyse_convs"

    def __init__(self, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()):
        self.include = tuple(include)
        self.exclude = tuple(exclude)

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        result = PassResult(self.name)
        self._kept = 0
        eligible = []
        for index, g in enumerate(list(iter_graphs(graph))):
            label = "main" if index == 0 else (g.name or f"subgraph{index}")
            for node in [n for n in g.nodes if n.op in CONV_OPS]:
                spec = ConvSpec.from_node(node, g, context.shapes) if node.op == "Conv" else None
                pixels = (context.conv_pixels or {}).get(node.outputs[0].name) if node.outputs else None
                plan = base_plan(node, spec, pixels)
                plan.graph = label
                plan.reason = self.ineligible_reason(node, spec, graph)
                if plan.reason is None:
                    eligible.append((plan, spec, pixels))
                result.facts.append(plan)
        # The SVDs are most of a data-free run's own time (0.4 s of VGG16's 1.2 s); numpy's LAPACK calls release
        # the GIL, so they run on every core, a core's worth of convs at a time (each batch's spectra are held
        # until their curves are read, and only the kept ones after).
        workers = available_cores()
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(eligible), workers):
                batch = eligible[start : start + workers]
                spectra = pool.map(lambda item: lowrank.channel_spectra(item[1].weight, item[1].group), batch)
                for (plan, spec, pixels), conv_spectra in zip(batch, list(spectra)):
                    self._add_error_curve(plan, spec, pixels, conv_spectra)
        return result

    def _add_error_curve(self, plan: LayerPlan, spec: ConvSpec, pixels: int | None, spectra: lowrank.ChannelSpectra) -> None:
        errors = lowrank.relative_errors(spectra)
        size = spectra.u.nbytes + spectra.s.nbytes + spectra.vt.nbytes
        keep = self._kept + size <= KEEP_SPECTRA_BYTES
        self._kept += size if keep else 0
        plan.eligible = True
        plan.full_rank = spectra.full_rank
        plan.analysis = ConvAnalysis(
            [float(e) for e in errors], spec.kernel_size, spec.output_pixels() if pixels is None else pixels,
            spec.has_bias, spectra if keep else None,
        )
        plan.error_at_rank = [float(e) ** 2 for e in errors[1:]]
        plan.error_source = "weights"
        if can_project(spec.in_channels, spec.group):
            plan.projection_macs_per_pixel = projection_macs_per_pixel(spec)

    def ineligible_reason(self, node: gs.Node, spec: ConvSpec | None, root: gs.Graph) -> str | None:
        """Why this conv cannot be rewritten, or None."""
        if node.op != "Conv":
            return f"quantized conv ({node.op}): integer weights are not factorised"
        selection = _selection_reason(node.name, self.include, self.exclude)
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


def projection_macs_per_pixel(spec: ConvSpec) -> int:
    """MACs per output pixel of the projected rewrite's 1×1 input mix: ``M`` per *input* pixel (the stride's
    square at stride ``s``; the product of the strides when a spatial dim is unknown)."""
    spatial_in = spec.input_shape[2:] if spec.input_shape is not None else None
    spatial_out = spec.output_spatial
    if spatial_in and spatial_out and all(d is not None for d in (*spatial_in, *spatial_out)):
        ratio = math.prod(spatial_in) / max(math.prod(spatial_out), 1)
    else:
        ratio = math.prod(spec.geometry.strides)
    return math.ceil(spec.in_channels * ratio)


def base_plan(node: gs.Node, spec: ConvSpec | None, pixels: int | None = None) -> LayerPlan:
    """A 'skipped' plan with the layer's shape facts filled in (costed at ``pixels`` output positions if given)."""
    output = node.outputs[0].name if node.outputs else ""
    if spec is None or spec.weight_shape is None or spec.kernel_size is None:
        return LayerPlan(
            node=node.name, op=node.op, output=output, status=SKIPPED, reason=None, rank=None, form=None,
            kernel=list(spec.kernel_shape) if spec and spec.kernel_shape else None,
            in_channels=None, out_channels=None, group=int(node.attrs.get("group", 1)),
            macs_before=None, macs_after=None, params_before=None, params_after=None,
        )  # fmt: skip
    before = conv_cost(
        spec.in_channels, spec.out_channels, spec.kernel_size, spec.group,
        spec.output_pixels() if pixels is None else pixels, spec.has_bias,
    )
    return LayerPlan(
        node=node.name, op=node.op, output=output, status=SKIPPED, reason=None, rank=None, form=None,
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
