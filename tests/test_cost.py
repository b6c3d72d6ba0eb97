"""Cost model: the seed's worked example, output shapes against onnx shape inference."""

from __future__ import annotations

import itertools

import onnx
import pytest
from conftest import conv_model

import dsrewrite
from dsrewrite.cost import conv_cost, separable_cost
from dsrewrite.geometry import ConvGeometry


def test_seed_worked_example():
    before = conv_cost(192, 256, 9, 1, 28 * 28, has_bias=False)
    after = separable_cost(192, 256, 9, 1, 1, 28 * 28, has_bias=False)
    assert before.macs == 346_816_512
    assert after.macs == 39_889_920
    assert round(after.macs / before.macs, 4) == 0.1150


def test_seed_worked_example_through_the_rewrite():
    model = conv_model(in_channels=192, out_channels=256, spatial=(28, 28), pads=(1, 1, 1, 1), bias=False)
    (layer,) = dsrewrite.rewrite(model, rank=1, verify=False).report.layers
    assert (layer.macs_before, layer.macs_after) == (346_816_512, 39_889_920)
    assert layer.macs_after / layer.macs_before == pytest.approx(1 / 256 + 1 / 9, rel=1e-12)


def test_grouped_costs():
    assert conv_cost(8, 12, 9, 2, 1, has_bias=True).macs_per_pixel == 12 * 4 * 9
    assert separable_cost(8, 12, 9, 2, 2, 1, has_bias=True).macs_per_pixel == 2 * 8 * 9 + 2 * 4 * 12


def test_params_move_the_bias_to_the_pointwise_conv():
    assert conv_cost(4, 6, 9, 1, None, has_bias=True).params == 6 * 4 * 9 + 6
    assert separable_cost(4, 6, 9, 1, 1, None, has_bias=True).params == 4 * 9 + 6 * 4 + 6


# SAME padding with dilation is not well defined (onnxruntime rejects it), so those combinations are left out.
OUTPUT_CASES = [
    case
    for case in itertools.product([7, 10], [1, 3], [1, 2, 3], [(0, 0), (1, 2)], [1, 2], ["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"])
    if not (case[5].startswith("SAME") and case[4] > 1)
]


@pytest.mark.parametrize("size,kernel,stride,pad,dilation,auto_pad", OUTPUT_CASES)
def test_output_spatial_matches_onnx_shape_inference(size, kernel, stride, pad, dilation, auto_pad):
    model = conv_model(
        kernel=(kernel,), spatial=(size,), strides=(stride,), dilations=(dilation,),
        pads=pad if auto_pad == "NOTSET" else None, auto_pad=None if auto_pad == "NOTSET" else auto_pad,
    )  # fmt: skip
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    ours = ConvGeometry((kernel,), (stride,), tuple(pad), (dilation,), auto_pad).output_spatial([size])
    assert ours == dims[2:]
