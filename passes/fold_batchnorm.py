"""fold_batchnorm: fold an inference-mode BatchNormalization into the Conv before it.

Before::

    x ─ Conv(W, b) ─ t ─ BatchNormalization(γ, β, μ, σ², ε) ─ y

After::

    x ─ Conv(W', b') ─ y

Math: with ``a = γ / √(σ² + ε)`` per output channel,
``W'[n] = a[n]·W[n]`` and ``b' = a·(b − μ) + β`` (``b = 0`` when absent).
Computed in float64, stored in the weight's dtype.

Folded only when ``t`` feeds nothing but the BatchNormalization and is not a
graph output, the BatchNormalization is in inference mode (one output), and
every parameter is a constant. Folding first means the later factorisation
sees the kernel the model really applies.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from dsrewrite.graph import NameAllocator, consumers, constant_value, is_graph_output, iter_graphs, producer
from dsrewrite.pipeline import Change, PassBase, PassContext, PassResult, Skip

log = logging.getLogger(__name__)


class FoldBatchNorm(PassBase):
    name = "fold_batchnorm"

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        result = PassResult(self.name)
        names = NameAllocator(graph)
        for g in list(iter_graphs(graph)):
            for bn in [n for n in g.nodes if n.op == "BatchNormalization"]:
                conv = producer(bn.inputs[0])
                if conv is None or conv.op != "Conv":
                    continue
                reason = self._why_not(conv, bn, graph)
                if reason:
                    result.skips.append(Skip(bn.name, reason))
                    continue
                self._fold(g, conv, bn, names)
                result.changes.append(Change(conv.name, f"folded BatchNormalization '{bn.name}'"))
        return result

    @staticmethod
    def _why_not(conv: gs.Node, bn: gs.Node, root: gs.Graph) -> str | None:
        t = conv.outputs[0]
        if len(consumers(t)) != 1 or is_graph_output(t, root):
            return f"not folded into '{conv.name}': the conv output has other consumers"
        if len([o for o in bn.outputs if o.name]) > 1 or int(bn.attrs.get("training_mode", 0)):
            return "not folded: BatchNormalization is in training mode"
        if any(constant_value(t) is None for t in bn.inputs[1:5]):
            return "not folded: BatchNormalization parameters are computed at run time"
        weight = constant_value(conv.inputs[1])
        if weight is None or weight.dtype.kind != "f":
            return f"not folded: '{conv.name}' has no constant float weight"
        if len(consumers(conv.inputs[1])) != 1:
            return f"not folded: the weight of '{conv.name}' is shared with other nodes"
        if len(conv.inputs) > 2 and conv.inputs[2].name:
            if constant_value(conv.inputs[2]) is None or len(consumers(conv.inputs[2])) != 1:
                return f"not folded: the bias of '{conv.name}' is computed at run time or shared"
        return None

    @staticmethod
    def _fold(g: gs.Graph, conv: gs.Node, bn: gs.Node, names: NameAllocator) -> None:
        weight = constant_value(conv.inputs[1])
        gamma, beta, mean, var = (constant_value(t).astype(np.float64) for t in bn.inputs[1:5])
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
        bias = constant_value(conv.inputs[2]).astype(np.float64) if has_bias else np.zeros_like(mean)
        shape = (-1,) + (1,) * (weight.ndim - 1)
        new_weight = (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)
        new_bias = (scale * (bias - mean) + beta).astype(weight.dtype)
        base = conv.name or "conv"
        w_const = gs.Constant(names.fresh(f"{base}/W_bnfolded"), new_weight)
        b_const = gs.Constant(names.fresh(f"{base}/B_bnfolded"), new_bias)
        conv.inputs = [conv.inputs[0], w_const, b_const]
        y = bn.outputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        conv.outputs = [y]
        g.nodes.remove(bn)
        log.debug("folded %s into %s", bn.name, conv.name)
