"""fold_batchnorm: Conv + inference BatchNormalization -> one Conv, only when safe."""

from __future__ import annotations

import numpy as np
from conftest import assert_same_outputs, conv_model, ops, random_input
from onnx import TensorProto, helper, numpy_helper

from dsrewrite.passes import FoldBatchNorm
from dsrewrite.pipeline import Pipeline


def with_batchnorm(model, *, extra_consumer=False):
    rng = np.random.default_rng(7)
    n = numpy_helper.to_array(model.graph.initializer[0]).shape[0]
    params = {
        "gamma": rng.uniform(0.5, 1.5, n), "beta": rng.normal(0, 0.1, n),
        "mean": rng.normal(0, 0.1, n), "var": rng.uniform(0.5, 2.0, n),
    }  # fmt: skip
    for name, value in params.items():
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    model.graph.node[-1].output[0] = "t"
    model.graph.node.append(
        helper.make_node("BatchNormalization", ["t", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=1e-3)
    )
    if extra_consumer:
        model.graph.node.append(helper.make_node("Relu", ["t"], ["r"], name="relu"))
        model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [None] * 4))
    return model


def test_folds_into_the_conv_and_keeps_the_outputs():
    for bias in (True, False):
        model = with_batchnorm(conv_model(bias=bias, pads=(1, 1, 1, 1)))
        outcome = Pipeline([FoldBatchNorm()]).run(model)
        assert ops(outcome.model) == ["Conv"]
        assert outcome.results[0].changes[0].node == "conv"
        assert_same_outputs(model, outcome.model, {"x": random_input((1, 4, 9, 9))}, atol=1e-5)


def test_does_not_fold_when_the_conv_output_has_other_consumers():
    model = with_batchnorm(conv_model(), extra_consumer=True)
    outcome = Pipeline([FoldBatchNorm()]).run(model)
    assert "BatchNormalization" in ops(outcome.model)
    assert "other consumers" in outcome.results[0].skips[0].reason


# -- a BatchNormalization exported as per-channel Mul / Add ---------------------------------------


def with_affine(model, ops_and_shapes, *, as_constant_nodes=False, extra_consumer=False):
    """Append ``op(t, constant of shape)`` nodes after the conv, in order, ending in 'y' and then a Relu to 'z'."""
    rng = np.random.default_rng(3)
    graph = model.graph
    graph.node[-1].output[0] = "t0"
    for i, (op, shape) in enumerate(ops_and_shapes):
        value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        name = f"c{i}"
        if as_constant_nodes:
            graph.node.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, f"{name}_v")))
        else:
            graph.initializer.append(numpy_helper.from_array(value, name))
        inputs = [f"t{i}", name] if op != "Mul" or i % 2 == 0 else [name, f"t{i}"]  # Mul/Add commute
        graph.node.append(helper.make_node(op, inputs, [f"t{i + 1}"], name=f"{op.lower()}{i}"))
    graph.node.append(helper.make_node("Relu", [f"t{len(ops_and_shapes)}"], ["y"], name="relu"))
    if extra_consumer:
        graph.node.append(helper.make_node("Neg", ["t0"], ["r"], name="neg"))
        graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [None] * 4))
    return model


def test_folds_a_per_channel_mul_add_sub_chain_and_keeps_the_outputs():
    feed = {"x": random_input((1, 4, 9, 9))}
    chains = [
        [("Mul", (1, 6, 1, 1)), ("Add", (1, 6, 1, 1))],  # BatchNormalization as PyTorch/Paddle exporters write it
        [("Mul", (6, 1, 1)), ("Sub", (1, 6, 1, 1)), ("Mul", ())],  # a per-channel shape without batch; a scalar
        [("Add", (1, 1, 1, 1)), ("Mul", (1, 6, 1, 1))],
    ]
    for bias in (True, False):
        for constant_nodes in (False, True):
            for chain in chains:
                model = with_affine(conv_model(bias=bias, pads=(1, 1, 1, 1)), chain, as_constant_nodes=constant_nodes)
                outcome = Pipeline([FoldBatchNorm()]).run(model)
                assert [op for op in ops(outcome.model) if op != "Constant"] == ["Conv", "Relu"], chain  # cleanup drops them
                assert len(outcome.results[0].changes) == len(chain)
                assert_same_outputs(model, outcome.model, {**feed}, atol=1e-5)


def test_leaves_mul_and_add_that_are_not_a_per_channel_affine():
    for chain in (
        [("Mul", (1, 6, 9, 1))],  # varies along a spatial axis
        [("Add", (1, 1, 1, 9))],
        [("Mul", (6,))],  # broadcasts along the last axis, not the channels
        [("Add", (1, 1, 6, 1, 1))],  # would add an axis
    ):
        model = with_affine(conv_model(pads=(1, 1, 1, 1)), chain)
        outcome = Pipeline([FoldBatchNorm()]).run(model)
        assert ops(outcome.model) == ["Conv", chain[0][0], "Relu"], chain
        assert not outcome.results[0].changes and not outcome.results[0].skips


def test_leaves_a_subtraction_from_a_constant_and_a_runtime_operand():
    model = with_affine(conv_model(pads=(1, 1, 1, 1)), [("Sub", (1, 6, 1, 1))])
    sub = model.graph.node[-2]
    sub.input[0], sub.input[1] = sub.input[1], sub.input[0]  # c − t
    assert ops(Pipeline([FoldBatchNorm()]).run(model).model) == ["Conv", "Sub", "Relu"]

    model = with_affine(conv_model(pads=(1, 1, 1, 1)), [("Mul", (1, 6, 1, 1))])
    model.graph.initializer.pop()  # the scale becomes a graph input
    model.graph.input.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, 6, 1, 1]))
    assert ops(Pipeline([FoldBatchNorm()]).run(model).model) == ["Conv", "Mul", "Relu"]


def test_does_not_fold_an_affine_when_the_conv_output_has_other_consumers_or_is_a_graph_output():
    # Another reader of the conv output: not a BatchNorm written out (e.g. the x + 3 of a written-out HardSwish).
    model = with_affine(conv_model(pads=(1, 1, 1, 1)), [("Mul", (1, 6, 1, 1))], extra_consumer=True)
    outcome = Pipeline([FoldBatchNorm()]).run(model)
    assert "Mul" in ops(outcome.model) and not outcome.results[0].skips
    # The affine's only reader, but the conv output is also a graph output: a skip with the reason.
    model = with_affine(conv_model(pads=(1, 1, 1, 1)), [("Mul", (1, 6, 1, 1))])
    model.graph.output.append(helper.make_tensor_value_info("t0", TensorProto.FLOAT, [None] * 4))
    outcome = Pipeline([FoldBatchNorm()]).run(model)
    assert "Mul" in ops(outcome.model)
    assert "other consumers" in outcome.results[0].skips[0].reason
