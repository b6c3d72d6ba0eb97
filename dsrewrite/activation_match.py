"""Find the elementwise activation a conv's output feeds, through per-channel affine ops.

``match_activation(conv, out_channels)`` walks from the conv's output through
single-consumer Mul/Add/Sub/Div/BatchNormalization by per-channel constants
(folded BatchNorm as Conv→Mul→Add), then recognises one activation:

* ``Relu``, ``LeakyRelu``, ``PRelu`` (constant slope), ``Clip`` (constant bounds; Relu6);
* ``HardSwish``; ``HardSigmoid`` followed by ``Mul`` with its own input; HardSwish
  written out as ``x · Clip(x + 3, 0, 6) / 6``;
* SiLU written as ``x · Sigmoid(x)`` (also ``Sigmoid(β·x)``);
* ``Gelu`` (opset 20) and the usual ``x · 0.5 · (1 + Erf(x / √2))`` export.

It answers a :class:`~dsrewrite.activation_fit.Activation` (the affine folded into
its ``scale``/``shift``) or a reason why the linear fit is used. Reading only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .activation_fit import Activation
from .graph import constant_value

AFFINE_OPS = ("Mul", "Add", "Sub", "Div", "BatchNormalization")


@dataclass(frozen=True)
class AffineChain:
    """Where a conv's output ends up after single-consumer per-channel affine ops: ``tensor = scale·y + shift``."""

    tensor: gs.Tensor
    scale: np.ndarray
    shift: np.ndarray
    steps: tuple[str, ...]  # the ops walked through


def follow_channel_affine(conv: gs.Node, channels: int, spatial: int, graph_outputs: set[str] = frozenset()) -> AffineChain | str:
    """Walk from ``conv``'s output through single-consumer Mul/Add/Sub/Div/BatchNormalization by per-channel
    constants; stop at anything else. A reason string when the walk meets a graph output or a dead end."""
    scale, shift = np.ones(channels), np.zeros(channels)
    tensor = conv.outputs[0]
    steps = []
    while True:
        if tensor.name in graph_outputs:
            return "the conv's output is a graph output"
        users = list(tensor.outputs)
        if not users:
            return "the conv's output has no consumers"
        if len(users) != 1 or users[0].op not in AFFINE_OPS:
            break
        affine = channel_affine(users[0], tensor, channels, spatial)
        if affine is None:
            break
        a, c = affine
        scale, shift = a * scale, a * shift + c
        steps.append(users[0].op)
        tensor = users[0].outputs[0]
    return AffineChain(tensor, scale, shift, tuple(steps))


def match_activation(conv: gs.Node, out_channels: int, graph_outputs: set[str] = frozenset()) -> Activation | str:
    """The activation on ``conv``'s output, or a reason string when there is none to fit through."""
    spatial = len(conv.inputs[1].shape) - 2 if conv.inputs[1].shape is not None else 2
    chain = follow_channel_affine(conv, out_channels, spatial, graph_outputs)
    if isinstance(chain, str):
        return chain
    found = _activation(chain.tensor, out_channels, spatial)
    if isinstance(found, str):
        return found
    kind, params, label = found
    prefix = "·".join(chain.steps)
    return Activation(kind, scale=chain.scale, shift=chain.shift, label=f"{prefix} → {label}" if prefix else label, **params)


def _channel_constant(tensor: gs.Tensor, channels: int, spatial: int) -> np.ndarray | None:
    """A constant that broadcasts per channel against ``(B, N, *spatial)``, as ``(N,)``; else None."""
    value = constant_value(tensor)
    if value is None or value.dtype.kind not in "fiu":
        return None
    value = np.asarray(value, dtype=np.float64)
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    if value.size != channels or value.ndim < spatial + 1:
        return None
    axis = value.ndim - spatial - 1  # the channel axis after right-aligned broadcasting
    if value.shape[axis] != channels:
        return None
    return value.reshape(-1)


def _scalar(tensor: gs.Tensor) -> float | None:
    value = constant_value(tensor)
    if value is None or value.size != 1:
        return None
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def _other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The input of a binary ``node`` that is not ``tensor`` (None when both are, or it is not binary)."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is tensor and b is not tensor:
        return b
    if b is tensor and a is not tensor:
        return a
    return None


def channel_affine(node: gs.Node, tensor: gs.Tensor, channels: int, spatial: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(a, c)`` with ``node(x) = a·x + c`` per channel, or None."""
    if node.op == "BatchNormalization":
        if node.inputs[0] is not tensor or len(node.outputs) != 1:
            return None
        params = [_channel_constant(t, channels, 0) for t in node.inputs[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, mean, var = params
        a = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        return a, beta - mean * a
    other = _other(node, tensor)
    k = None if other is None else _channel_constant(other, channels, spatial)
    if k is None:
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op == "Mul":
        return k, zeros
    if node.op == "Add":
        return ones, k
    if node.op == "Sub":
        return (ones, -k) if node.inputs[0] is tensor else (-ones, k)
    if node.inputs[0] is tensor and np.all(k != 0):  # Div by a constant
        return 1.0 / k, zeros
    return None


def _only_user(tensor: gs.Tensor, op: str) -> gs.Node | None:
    users = list(tensor.outputs)
    return users[0] if len(users) == 1 and users[0].op == op else None


def _mul_with(node: gs.Node | None, tensor: gs.Tensor) -> bool:
    return node is not None and node.op == "Mul" and tensor in node.inputs


def _activation(u: gs.Tensor, channels: int, spatial: int):
    """``(kind, params, label)`` of the activation reading ``u``, or a reason string."""
    users = list(u.outputs)
    if len(users) == 1:
        node = users[0]
        if node.op == "Relu":
            return "relu", {}, "Relu"
        if node.op == "LeakyRelu":
            return "relu", {"slope": float(node.attrs.get("alpha", 0.01))}, "LeakyRelu"
        if node.op == "PRelu":
            slope = _channel_constant(node.inputs[1], channels, spatial)
            return ("relu", {"slope": slope}, "PRelu") if slope is not None else "PRelu slope is not a per-channel constant"
        if node.op == "Clip":
            bounds = _clip_bounds(node)
            return ("clip", {"low": bounds[0], "high": bounds[1]}, "Clip") if bounds else "Clip bounds are not constants"
        if node.op == "HardSwish":
            return "hard_gate", {"alpha": 1.0 / 6.0, "beta": 0.5}, "HardSwish"
        if node.op == "Gelu":
            tanh = node.attrs.get("approximate", "none") in ("tanh", b"tanh")
            return ("gelu_tanh" if tanh else "gelu"), {}, "Gelu"
        return f"the output feeds {node.op}, not an elementwise activation"
    if len(users) != 2:
        return f"the output has {len(users)} consumers"
    for gate, final in (users, users[::-1]):
        found = _gated(u, gate, final)
        if found is not None:
            return found
    return "the output has two consumers that form no known activation"


def _gated(u: gs.Tensor, gate: gs.Node, final: gs.Node):
    """``u · gate(u)`` patterns: ``final`` is the Mul (possibly followed by constant scaling) reading u."""
    if gate.op == "HardSigmoid":
        if _mul_with(_only_user(gate.outputs[0], "Mul"), u) and _only_user(gate.outputs[0], "Mul") is final:
            params = {"alpha": float(gate.attrs.get("alpha", 0.2)), "beta": float(gate.attrs.get("beta", 0.5))}
            return "hard_gate", params, "HardSigmoid·x"
        return None
    if gate.op == "Sigmoid":
        if _only_user(gate.outputs[0], "Mul") is final and _mul_with(final, u):
            return "silu", {}, "Sigmoid·x"
        return None
    if gate.op == "Mul" and _scalar(_other(gate, u) or u) is not None:  # Sigmoid(β·u)·u
        sig = _only_user(gate.outputs[0], "Sigmoid")
        if sig is not None and _only_user(sig.outputs[0], "Mul") is final and _mul_with(final, u):
            return "silu", {"gain": _scalar(_other(gate, u))}, "Sigmoid(β·x)·x"
        return None
    if gate.op == "Add" and _close(_scalar(_other(gate, u) or u), 3.0):  # x · Clip(x + 3, 0, 6) / 6
        clip = _only_user(gate.outputs[0], "Clip")
        if clip is None or _clip_bounds(clip) is None or not np.allclose(_clip_bounds(clip), (0.0, 6.0)):
            return None
        after = list(clip.outputs[0].outputs)
        if len(after) != 1:
            return None
        if after[0] is final and _mul_with(final, u):  # Mul then Div 6 (or Mul 1/6)
            return ("hard_gate", {}, "x·Clip(x+3,0,6)/6") if _divides_by_six(final.outputs[0]) else None
        if _divides_by_six(clip.outputs[0]) and _mul_with(final, u):  # Div 6 then Mul
            return "hard_gate", {}, "x·Clip(x+3,0,6)/6"
        return None
    if gate.op in ("Div", "Mul") and gate.inputs[0] is u:  # x · 0.5 · (1 + Erf(x / √2))
        k = _scalar(gate.inputs[1])
        if k is None or not (_close(k, math.sqrt(2.0)) if gate.op == "Div" else _close(k, 1 / math.sqrt(2.0))):
            return None
        erf = _only_user(gate.outputs[0], "Erf")
        add = erf and _only_user(erf.outputs[0], "Add")
        if not add or not _close(_scalar(_other(add, erf.outputs[0]) or erf.outputs[0]), 1.0):
            return None
        mul = _only_user(add.outputs[0], "Mul")
        if mul is final and _mul_with(mul, u):
            half = _only_user(mul.outputs[0], "Mul")
            if half is not None and _close(_scalar(_other(half, mul.outputs[0]) or mul.outputs[0]), 0.5):
                return "gelu", {}, "Erf GELU"
        return None
    return None


def _divides_by_six(tensor: gs.Tensor) -> bool:
    """Whether ``tensor``'s only consumer divides it by 6 (or multiplies by 1/6)."""
    users = list(tensor.outputs)
    if len(users) != 1 or users[0].op not in ("Div", "Mul") or users[0].inputs[0] is not tensor:
        return False
    k = _scalar(users[0].inputs[1])
    return _close(k, 6.0) if users[0].op == "Div" else _close(k, 1 / 6.0)


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """Clip's ``(min, max)`` from constant inputs (opset ≥ 11) or attributes; missing bounds are infinite."""
    bounds = []
    for index, attr, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        if len(node.inputs) > index and node.inputs[index].name:
            value = _scalar(node.inputs[index])
            if value is None:
                return None
            bounds.append(value)
        else:
            bounds.append(float(node.attrs.get(attr, default)))
    return bounds[0], bounds[1]


def _close(value: float | None, want: float) -> bool:
    return value is not None and abs(value - want) <= 1e-4 * max(1.0, abs(want))
