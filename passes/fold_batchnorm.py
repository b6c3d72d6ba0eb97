"""fold_batchnorm: fold an inference-mode BatchNormalization into the Conv before it,
also when it was exported as a per-channel Mul and Add.

Before::

    x ─ Conv(W, b) ─ t ─ BatchNormalization(γ, β, μ, σ², ε) ─ y
    x ─ Conv(W, b) ─ t ─ Mul(s) ─ Add(c) ─ y          (s, c constant per channel or scalar)

After::

    x ─ Conv(W', b') ─ y

Math: with ``a = γ / √(σ² + ε)`` per output channel,
``W'[n] = a[n]·W[n]`` and ``b' = a·(b − μ) + β`` (``b = 0`` when absent).
A constant ``Mul`` by ``s`` gives ``W'[n] = s[n]·W[n]``, ``b' = s·b``; an ``Add`` of ``c``
(or ``Sub`` of it) gives ``b' = b ± c``. Computed in float64, stored in the weight's dtype.

Folded only when ``t`` feeds nothing but the BatchNormalization (or the Mul/Add/Sub)
and is not a graph output, the BatchNormalization is in inference mode (one output),
every parameter is a constant, and a Mul/Add/Sub constant varies along the channel
axis at most. Folding first means the later factorisation sees the kernel the model
really applies. It also keeps onnxruntime's fusions after a rewrite: onnxruntime
folds a constant Mul/Add into a Conv itself, but not into the Sum or Add that ends a
rewritten conv, where they would stay as separate nodes that split its NCHWc chain.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from dsrewrite.activation_match import channel_affine
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
                reason = _output_why_not(conv, graph) or _batchnorm_why_not(bn) or _weights_why_not(conv)
                if reason:
                    result.skips.append(Skip(bn.name, reason))
                    continue
                self._fold(g, conv, bn, names)
                result.changes.append(Change(conv.name, f"folded BatchNormalization '{bn.name}'"))
            for conv in [n for n in g.nodes if n.op == "Conv"]:
                self._fold_affine_chain(g, conv, graph, names, result)
        return result

    # -- a BatchNormalization exported as per-channel Mul / Add --------------------------------

    def _fold_affine_chain(self, g: gs.Graph, conv: gs.Node, root: gs.Graph, names: NameAllocator, result: PassResult) -> None:
        """Fold the constant per-channel Mul, Add and Sub that follow ``conv``, one after another."""
        while True:
            nodes = consumers(conv.outputs[0])
            affine = _foldable_affine(conv, nodes[0]) if len(nodes) == 1 else None
            if affine is None:
                # Not a BatchNorm written out: an ordinary Mul/Add (a residual sum, a runtime scale), or one of
                # several readers of the conv output (e.g. the x + 3 of a HardSwish written out). Nothing to report.
                return
            op = nodes[0]
            reason = _output_why_not(conv, root) or _weights_why_not(conv)
            if reason:
                result.skips.append(Skip(op.name, reason))
                return
            self._fold_affine(g, conv, op, affine, names)
            result.changes.append(Change(conv.name, f"folded {op.op} '{op.name}' (a per-channel affine)"))

    @staticmethod
    def _fold_affine(g: gs.Graph, conv: gs.Node, op: gs.Node, affine: tuple[np.ndarray, np.ndarray], names: NameAllocator) -> None:
        """``W' = a·W`` (a Mul only: Add and Sub keep the weight), ``b' = a·b + c``."""
        a, c = affine
        weight = constant_value(conv.inputs[1])
        has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
        bias = constant_value(conv.inputs[2]).astype(np.float64) if has_bias else np.zeros(weight.shape[0])
        base = conv.name or "conv"
        w_const = conv.inputs[1]
        if op.op == "Mul":
            shape = (-1,) + (1,) * (weight.ndim - 1)
            new_weight = (weight.astype(np.float64) * a.reshape(shape)).astype(weight.dtype)
            w_const = gs.Constant(names.fresh(f"{base}/W_affinefolded"), new_weight)
        b_const = gs.Constant(names.fresh(f"{base}/B_affinefolded"), (a * bias + c).astype(weight.dtype))
        _absorb(g, conv, op, w_const, b_const)
        log.debug("folded %s %s into %s", op.op, op.name, conv.name)


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
        _absorb(g, conv, bn, w_const, b_const)
        log.debug("folded %s into %s", bn.name, conv.name)


def _output_why_not(conv: gs.Node, root: gs.Graph) -> str | None:
    t = conv.outputs[0]
    if len(consumers(t)) != 1 or is_graph_output(t, root):
        return f"not folded into '{conv.name}': the conv output has other consumers or is a graph output"
    return None


def _batchnorm_why_not(bn: gs.Node) -> str | None:
    if len([o for o in bn.outputs if o.name]) > 1 or int(bn.attrs.get("training_mode", 0)):
        return "not folded: BatchNormalization is in training mode"
    if any(constant_value(t) is None for t in bn.inputs[1:5]):
        return "not folded: BatchNormalization parameters are computed at run time"
    return None


def _weights_why_not(conv: gs.Node) -> str | None:
    """Why the conv's weight and bias cannot take a fold: not constant floats, or shared with other nodes."""
    weight = constant_value(conv.inputs[1])
    if weight is None or weight.dtype.kind != "f":
        return f"not folded: '{conv.name}' has no constant float weight"
    if len(consumers(conv.inputs[1])) != 1:
        return f"not folded: the weight of '{conv.name}' is shared with other nodes"
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        if constant_value(conv.inputs[2]) is None or len(consumers(conv.inputs[2])) != 1:
            return f"not folded: the bias of '{conv.name}' is computed at run time or shared"
    return None


def _absorb(g: gs.Graph, conv: gs.Node, node: gs.Node, weight: gs.Tensor, bias: gs.Tensor) -> None:
    """``conv`` takes the folded weight and bias and computes ``node``'s output; ``node`` leaves the graph."""
    conv.inputs = [conv.inputs[0], weight, bias]
    y = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    conv.outputs = [y]
    g.nodes.remove(node)


def _foldable_affine(conv: gs.Node, op: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """``(a, c)`` with ``op(t) = a·t + c`` per output channel of ``conv`` (``activation_match.channel_affine``), or
    None.

    Only for a Mul, Add or Sub of the conv output ``t`` and a constant of the weight's dtype that broadcasts along
    the channel axis only (a scalar, ``(N,1,1)``, ``(1,N,1,1)``, ...), so the result keeps the conv output's shape.
    A Sub must subtract the constant (``t − c``); ``c − t`` is left alone.
    """
    t = conv.outputs[0]
    weight = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if weight is None or op.op not in ("Mul", "Add", "Sub") or (op.op == "Sub" and op.inputs[0] is not t):
        return None
    others = [constant_value(i) for i in op.inputs if i is not t]
    value = others[0] if len(others) == 1 else None
    if value is None or value.dtype != weight.dtype or value.dtype.kind != "f" or value.ndim > weight.ndim:
        return None
    affine = channel_affine(op, t, weight.shape[0], weight.ndim - 2)
    return affine if affine is not None and all(np.all(np.isfinite(v)) for v in affine) else None
