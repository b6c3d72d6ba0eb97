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
