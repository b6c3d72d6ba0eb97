"""Find the depthwise conv a conv's output feeds with nothing nonlinear between (reading only).

``match_following_depthwise(conv, spec)`` walks from the conv's output through single-consumer per-channel
affine ops (``activation_match.follow_channel_affine``: Mul/Add/Sub/Div by constants, BatchNormalization) to one
Conv whose group equals the channel count and which has one constant filter per channel. The two convs are then
one linear map, and ``composed_fit`` fits the first one at the second one's output. It answers a
:class:`FollowingDepthwise` (the affine scale folded into the filters) or a reason string.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .activation_match import AFFINE_OPS, follow_channel_affine
from .composed_fit import composition_operator
from .geometry import ConvGeometry
from .graph import ConvSpec


@dataclass(frozen=True)
class FollowingDepthwise:
    node: str  # the depthwise conv's name
    output: str  # its output tensor: the fit's target
    geometry: ConvGeometry
    operator: np.ndarray  # (N, Kc, K): a K-tap filter of the first conv → its composed kernel for output channel o
    gain: np.ndarray  # (N,): how a constant in the first conv's output reaches the target
    offset: np.ndarray  # (N,): the constant the ops after the first conv add to the target (away from borders)

    @property
    def composed_taps(self) -> int:
        return self.operator.shape[1]


def match_following_depthwise(conv: gs.Node, spec: ConvSpec, graph_outputs: set[str] = frozenset()) -> FollowingDepthwise | str:
    """The depthwise conv ``conv``'s output feeds linearly, or why there is none to fit through."""
    if spec.group != 1:
        return "grouped conv"
    channels = spec.out_channels
    spatial = len(spec.kernel_shape)
    chain = follow_channel_affine(conv, channels, spatial, graph_outputs)
    if isinstance(chain, str):
        return chain
    tensor, scale, shift = chain.tensor, chain.scale, chain.shift
    users = list(tensor.outputs)
    if len(users) != 1:
        return f"the output has {len(users)} consumers"
    user = users[0]
    if user.op in AFFINE_OPS:
        return f"the output feeds a {user.op} that is not a per-channel constant"
    if user.op != "Conv" or user.inputs[0] is not tensor:
        return f"the output feeds {user.op}, not a depthwise conv"
    after = ConvSpec.from_node(user, spec.graph, {})
    if after.weight is None or after.geometry is None or after.group != channels or after.weight_shape[:2] != (channels, 1):
        return "the output feeds a conv that is not a constant depthwise conv with one filter per channel"
    if len(after.kernel_shape) != spatial or (after.has_bias and not after.bias_is_constant):
        return "the following depthwise conv has another dimensionality or a computed bias"
    if not np.all(np.isfinite(after.weight)) or (after.bias is not None and not np.all(np.isfinite(after.bias))):
        return "the following depthwise conv has non-finite weights"
    filters = after.weight.astype(np.float64).reshape(channels, *after.kernel_shape)
    sums = filters.reshape(channels, -1).sum(axis=1)
    bias = np.zeros(channels) if after.bias is None else after.bias.astype(np.float64).reshape(-1)
    operator = composition_operator(spec.geometry, spec.kernel_shape, after.geometry, scale.reshape(-1, *[1] * spatial) * filters)
    return FollowingDepthwise(
        node=user.name or user.outputs[0].name,
        output=user.outputs[0].name,
        geometry=after.geometry,
        operator=operator,
        gain=scale * sums,
        offset=bias + shift * sums,
    )
