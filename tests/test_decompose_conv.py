"""decompose_conv: structure first (ops, attributes, names), then numbers against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, conv_model, ops, random_input, run
from onnx import TensorProto, helper, numpy_helper

import dsrewrite
from dsrewrite.passes import Cleanup, DecomposeConv, DecomposeOptions
from dsrewrite.pipeline import Pipeline


def rewrite(model, rank="full", **kw):
    return dsrewrite.rewrite(model, rank=rank, verify=False, **kw)


def layer(result, name="conv"):
    return next(layer for layer in result.report.layers if layer.node == name)


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def attrs(n):
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


# -- structure ------------------------------------------------------------------------------------


def test_rank1_is_one_depthwise_and_one_pointwise_without_concat():
    model = conv_model(in_channels=8, out_channels=16, strides=(2, 2), pads=(1, 1, 1, 1), dilations=(1, 1))
    result = rewrite(model, rank=1)
    assert ops(result.model) == ["Conv", "Conv"]
    dw, pw = node(result.model, "conv/dw0"), node(result.model, "conv/pw")
    assert attrs(dw)["group"] == 8 and attrs(dw)["strides"] == [2, 2] and attrs(dw)["pads"] == [1, 1, 1, 1]
    assert attrs(pw)["group"] == 1 and attrs(pw)["kernel_shape"] == [1, 1]
    assert "strides" not in attrs(pw) and "pads" not in attrs(pw)
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert inits[dw.input[1]].shape == (8, 1, 3, 3)
    assert inits[pw.input[1]].shape == (16, 8, 1, 1)
    assert pw.input[2] == "B", "the bias belongs on the pointwise conv"
    assert len(dw.input) == 2
    assert pw.output[0] == "y", "the graph output name is kept"


def test_rank_r_emits_r_multiplier1_depthwise_convs_a_concat_and_a_pointwise():
    model = conv_model(in_channels=8, out_channels=16)
    result = rewrite(model, rank=3)
    assert ops(result.model) == ["Conv", "Conv", "Conv", "Concat", "Conv"]
    names = [n.name for n in result.model.graph.node]
    assert names == ["conv/dw0", "conv/dw1", "conv/dw2", "conv/concat", "conv/pw"]
    concat = node(result.model, "conv/concat")
    assert attrs(concat)["axis"] == 1
    for j in range(3):
        assert attrs(node(result.model, f"conv/dw{j}"))["group"] == 8
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert inits[node(result.model, "conv/pw").input[1]].shape == (16, 24, 1, 1)


def test_new_names_avoid_collisions():
    model = conv_model()
    # Occupy the names the rewrite would derive.
    model.graph.value_info.append(helper.make_tensor_value_info("conv/dw0_out", TensorProto.FLOAT, [None] * 4))
    taken = helper.make_node("Identity", ["y"], ["conv/dw0"], name="conv/pw")
    model.graph.node.append(taken)
    model.graph.output[0].name = "conv/dw0"
    result = rewrite(model, rank=1)
    names = [n.name for n in result.model.graph.node]
    assert len(names) == len(set(names))
    tensors = [o for n in result.model.graph.node for o in n.output]
    assert len(tensors) == len(set(tensors))
    assert "conv/pw_1" in names


def test_auto_pad_goes_on_the_depthwise_convs():
    model = conv_model(auto_pad="SAME_LOWER", strides=(2, 2), spatial=(10, 7))
    result = rewrite(model, rank=2)
    for j in range(2):
        assert attrs(node(result.model, f"conv/dw{j}"))["auto_pad"] == b"SAME_LOWER"
    assert "auto_pad" not in attrs(node(result.model, "conv/pw"))


def test_grouped_conv_at_rank_above_one_uses_a_group_contiguous_depthwise():
    model = conv_model(in_channels=8, out_channels=12, group=2)
    result = rewrite(model, rank=2)
    assert ops(result.model) == ["Conv", "Conv"]
    dw, pw = result.model.graph.node
    assert attrs(dw)["group"] == 8
    assert attrs(pw)["group"] == 2
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert inits[dw.input[1]].shape == (16, 1, 3, 3)
    assert inits[pw.input[1]].shape == (12, 8, 1, 1)
    assert layer(result).form == "multiplier"
    assert_same_outputs(model, rewrite(model).model, {"x": random_input((1, 8, 9, 9))})


def test_rewritten_model_passes_the_full_onnx_checker():
    model = conv_model(in_channels=8, out_channels=16)
    result = rewrite(model, rank=2)
    onnx.checker.check_model(result.model, full_check=True)


# -- numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel=(3,), spatial=(17,)),
        dict(kernel=(5,), spatial=(20,), strides=(2,), pads=(2, 1)),
        dict(kernel=(3, 3)),
        dict(kernel=(3, 3), pads=(0, 1, 2, 1), strides=(2, 1)),
        dict(kernel=(3, 5), dilations=(2, 1), pads=(2, 2, 2, 2)),
        dict(kernel=(3, 3), auto_pad="SAME_UPPER", strides=(2, 2), spatial=(11, 8)),
        dict(kernel=(3, 3), auto_pad="SAME_LOWER", strides=(3, 2), spatial=(11, 8)),
        dict(kernel=(3, 3), auto_pad="VALID"),
        dict(kernel=(3, 3), bias=False),
        dict(kernel=(3, 3), weight_as_constant_node=True),
        dict(kernel=(2, 3, 3), spatial=(5, 7, 6)),
        dict(kernel=(3, 3, 3), spatial=(6, 6, 6), strides=(1, 2, 2), pads=(1, 0, 1, 1, 1, 0)),
        dict(kernel=(3, 3), in_channels=6, out_channels=9, group=3),
        dict(kernel=(1, 3), spatial=(1, 16)),
        dict(kernel=(3, 3), in_channels=3, out_channels=1),
    ],
)
def test_full_rank_reproduces_the_conv(kw):
    model = conv_model(**kw)
    result = rewrite(model)
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert layer(result).status == "rewritten"
    assert_same_outputs(model, result.model, {"x": random_input(x_shape)})


def test_dynamic_batch_and_spatial_dims_are_kept_and_still_exact():
    model = conv_model(batch="N", spatial=("H", "W"))
    result = rewrite(model)
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "H", "W"]
    for shape in [(1, 4, 9, 9), (3, 4, 16, 5)]:
        assert_same_outputs(model, result.model, {"x": random_input(shape)})
    assert layer(result).macs_before is None, "MACs cannot be known with unknown spatial dims"
    assert layer(result).macs_per_pixel_before == 6 * 4 * 9


def test_rank_r_matches_the_truncated_kernel():
    """At rank r the rewrite computes exactly the conv of the reconstructed low-rank kernel."""
    from dsrewrite import lowrank

    model = conv_model(in_channels=5, out_channels=7, bias=False)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    dense = lowrank.reconstruct(lowrank.factorize(lowrank.channel_spectra(weight), 2)).astype(np.float32)
    reference = conv_model(in_channels=5, out_channels=7, bias=False)
    reference.graph.initializer[0].CopyFrom(numpy_helper.from_array(dense, "W"))
    result = rewrite(model, rank=2)
    assert_same_outputs(reference, result.model, {"x": random_input((1, 5, 9, 9))})


def test_conv_inside_an_if_branch_is_rewritten_exactly():
    inner = conv_model(in_channels=4, out_channels=6, name="inner_conv")
    then_graph = helper.make_graph(
        list(inner.graph.node), "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
        initializer=list(inner.graph.initializer),
    )  # fmt: skip
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x_copy"], name="ident")], "else",
        [], [helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, [None] * 4)],
    )  # fmt: skip
    if_node = helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph(
        [if_node], "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None] * 4)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = rewrite(model)
    assert layer(result, "inner_conv").status == "rewritten"
    branches = {a.name: a.g for a in result.model.graph.node[0].attribute}
    then_ops = [n.op_type for n in branches["then_branch"].node]
    assert "Concat" in then_ops
    feeds = {"x": random_input((1, 4, 9, 9)), "cond": np.array(True)}
    assert_same_outputs(model, result.model, feeds)


# -- skips ----------------------------------------------------------------------------------------


def reason(model, rank="full", name="conv", **kw):
    result = rewrite(model, rank=rank, **kw)
    plan = layer(result, name)
    assert plan.status == "skipped"
    return plan.reason


def test_skips_a_1x1_kernel():
    assert "1x1" in reason(conv_model(kernel=(1, 1)))


def test_skips_a_depthwise_conv():
    assert "depthwise" in reason(conv_model(in_channels=6, out_channels=12, group=6))


def test_skips_when_the_rank_saves_no_macs():
    text = reason(conv_model(in_channels=4, out_channels=6), rank=5)
    assert "saves no MACs" in text


def test_skips_nan_and_inf_weights():
    model = conv_model()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    assert "NaN" in reason(model)


def test_skips_weights_computed_at_run_time():
    model = conv_model()
    w = model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Relu", ["W0"], ["W"], name="relu_w"))
    w.name = "W0"
    assert "run time" in reason(model)


def test_skips_shared_weights():
    model = conv_model(out_channels=4, pads=(1, 1, 1, 1))
    model.graph.node.append(helper.make_node("Conv", ["y", "W", "B"], ["z"], name="conv2", pads=[1, 1, 1, 1]))
    model.graph.output[0].name = "z"
    result = rewrite(model)
    for name in ("conv", "conv2"):
        assert "shared" in layer(result, name).reason


def test_skips_quantized_convs():
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [None] * 4)
    w = numpy_helper.from_array(np.ones((3, 2, 3, 3), np.uint8), "W")
    graph = helper.make_graph([helper.make_node("ConvInteger", ["x", "W"], ["y"], name="qconv")], "q", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = rewrite(model)
    assert "quantized" in layer(result, "qconv").reason
    assert ops(result.model) == ["ConvInteger"]


def test_skips_non_float_weights():
    model = conv_model()
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    # float64 is float: it is rewritten, in float64.
    result = rewrite(model)
    assert layer(result).status == "rewritten"


def test_include_and_exclude_select_by_node_name():
    model = conv_model()
    assert "--include" in reason(model, include=("other*",))
    assert "--exclude" in reason(model, exclude=("co*",))
    assert layer(rewrite(model, include=("co*",))).status == "rewritten"


def test_library_selection_takes_none_or_one_pattern():
    model = conv_model()
    assert layer(rewrite(model, include=None, exclude=None)).status == "rewritten"
    assert "--exclude" in reason(model, exclude="co*")  # one pattern, not its characters
    assert layer(rewrite(model, include="co*")).status == "rewritten"


def test_dry_run_plans_but_leaves_the_graph_alone():
    model = conv_model(in_channels=8, out_channels=16)
    result = dsrewrite.rewrite(model, rank=1, dry_run=True)
    assert ops(result.model) == ["Conv"]
    assert layer(result).status == "rewritten" and layer(result).rank == 1
    assert result.report.verification is None


def test_passes_compose_in_a_pipeline():
    model = conv_model(in_channels=8, out_channels=16)
    outcome = Pipeline([DecomposeConv(DecomposeOptions(rank=1)), Cleanup()]).run(model)
    assert ops(outcome.model) == ["Conv", "Conv"]
    assert [r.pass_name for r in outcome.results] == ["decompose_conv", "cleanup"]
    assert outcome.results[0].changes[0].node == "conv"
    x = random_input((1, 8, 9, 9))
    assert run(outcome.model, {"x": x})[0].shape == run(model, {"x": x})[0].shape


def test_a_failing_pass_is_named_with_the_passes_before_it():
    class Broken:
        name = "broken"

        def run(self, graph, context):
            raise RuntimeError("boom")

    with pytest.raises(dsrewrite.PassError) as info:
        Pipeline([Cleanup(), Broken()]).run(conv_model())
    assert "broken" in str(info.value) and "cleanup" in str(info.value)
