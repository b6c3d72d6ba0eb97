"""verify: error statistics, tolerance semantics, and the smallest passing tolerances."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import conv_model
from onnx import TensorProto, helper, numpy_helper

from dsrewrite.verify import feed_shapes, random_feeds, verify


def perturbed(model, scale):
    out = type(model)()
    out.CopyFrom(model)
    w = numpy_helper.to_array(out.graph.initializer[0]).copy()
    w[0, 0, 0, 0] += scale
    out.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    return out


def feeds(model, seed=0):
    return [random_feeds(model, feed_shapes(model, {}), seed)]


def test_identical_models_pass_at_zero_tolerance():
    model = conv_model()
    result = verify(model, model, feeds(model), atol=0.0, rtol=0.0)
    assert result.passed and result.samples == 1
    (out,) = result.outputs
    assert out.max_abs == 0 and out.cosine == pytest.approx(1.0) and out.min_atol == 0


def test_a_real_difference_fails_and_reports_what_would_pass():
    model = conv_model()
    other = perturbed(model, 0.5)
    result = verify(model, other, feeds(model), atol=1e-3, rtol=0.0)
    assert result.passed is False
    (out,) = result.outputs
    assert out.max_abs > 1e-3 and out.cosine < 1.0
    assert out.min_atol == pytest.approx(out.max_abs)
    again = verify(model, other, feeds(model), atol=out.min_atol * 1.0001, rtol=0.0)
    assert again.passed
    by_rtol = verify(model, other, feeds(model), atol=1e-3, rtol=out.min_rtol * 1.0001)
    assert by_rtol.passed


def test_without_a_tolerance_only_structure_and_finiteness_are_checked():
    model = conv_model()
    result = verify(model, perturbed(model, 0.5), feeds(model), atol=None, rtol=None)
    assert result.passed is None  # compared: no tolerance, no claim
    assert verify(model, perturbed(model, 0.5), feeds(model), atol=10.0, rtol=None).passed is True
    broken = perturbed(model, np.nan)
    assert verify(model, broken, feeds(model), atol=None, rtol=None).passed is False


def test_dynamic_dims_get_concrete_feed_shapes():
    model = conv_model(batch="N", spatial=("H", 12))
    assert feed_shapes(model, {}) == {"x": [1, 4, 64, 12]}
    assert feed_shapes(model, {"x": (2, 4, 10, 12)}) == {"x": [2, 4, 10, 12]}


def _as_float16(model):
    from onnx import TensorProto, numpy_helper

    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


@pytest.mark.parametrize(
    "config",
    [dict(in_channels=8, out_channels=16, pads=(1, 1, 1, 1)), dict(in_channels=8, out_channels=8, group=2, strides=(2, 2)),
     dict(kernel=(5,), in_channels=6, out_channels=12)],  # fmt: skip
)
def test_float16_models_are_exact_at_full_rank_under_float16_tolerances(config):
    import dsrewrite
    from onnx import TensorProto

    model = _as_float16(conv_model(**config))
    result = dsrewrite.rewrite(model, rank="full")
    verification = result.report.verification
    assert result.ok and verification.passed is True
    assert (verification.atol, verification.rtol) == (2e-2, 2e-2)  # float16's defaults, not float32's 1e-4
    assert all(t.data_type == TensorProto.FLOAT16 for t in result.model.graph.initializer)
    assert result.report.settings["atol"] == 2e-2


def test_bfloat16_convs_are_refused_with_one_clear_line(tmp_path, tmp_model):
    from conftest import dsrewrite_cli
    from onnx import TensorProto, helper

    model = conv_model()
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        tensor.CopyFrom(helper.make_tensor(tensor.name, TensorProto.BFLOAT16, values.shape, values.flatten().tolist()))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    code, out, err = dsrewrite_cli(tmp_model(model), "-o", tmp_path / "out.onnx", "--rank", "full")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: conv 'conv' has bfloat16 weights")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("name", ["vgg_small", "resnet_bn", "grouped_depthwise", "audio_conv1d", "dynamic_batch"])
def test_float16_conversions_of_the_sample_models_are_exact_at_full_rank(name):
    import dsrewrite
    import onnx
    from conftest import SAMPLES
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(SAMPLES / f"{name}.onnx"), keep_io_types=False)
    result = dsrewrite.rewrite(model, rank="full")
    assert result.ok and result.report.verification.passed is True
    assert result.report.totals.rewritten > 0


def test_float16_models_go_through_the_latency_aware_budget_and_calibration(tmp_path):
    import dsrewrite
    import onnx
    from conftest import SAMPLES
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(SAMPLES / "vgg_small.onnx"), keep_io_types=False)
    path = tmp_path / "c.npz"
    np.savez(path, input=np.random.default_rng(0).random((4, 1, 3, 64, 64)).astype(np.float32))
    result = dsrewrite.rewrite(model, target_macs=0.5, calibration=path, latency_cache=None)  # timed in float16
    assert result.ok and any(layer.latency_before_ms is not None for layer in result.report.layers)
    assert any("cast to the model's float16" in note for note in result.report.notes)


def test_figures_accumulated_feed_by_feed_match_one_comparison_of_everything():
    from dsrewrite.verify import _compare

    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 50)).astype(np.float32)
    a[0, 0, :5] = 0.0  # exact zeros: the relative error's floor comes from the largest magnitude of all feeds
    a[2, 1, 3] = np.nan  # not finite in the reference: left out
    b = (a + rng.standard_normal(a.shape).astype(np.float32) * 0.01).astype(np.float32)
    for atol, rtol in ((None, None), (0.02, 0.0), (0.0, 0.5)):
        per_feed, _ = _compare("y", [(a[i : i + 1], b[i : i + 1]) for i in range(3)], atol, rtol)
        whole, _ = _compare("y", [(a.reshape(1, 12, 50), b.reshape(1, 12, 50))], atol, rtol)
        for field in ("max_abs", "mean_abs", "max_rel", "cosine", "min_atol", "min_rtol"):
            assert getattr(per_feed, field) == pytest.approx(getattr(whole, field), rel=1e-9), field
        assert per_feed.passed == whole.passed and per_feed.finite and whole.finite


@pytest.mark.parametrize("last_dim, has_decisions", [(16, True), ("anchors", False)])
def test_argmax_agreement_only_over_a_last_axis_of_fixed_size(last_dim, has_decisions):
    """A last axis the model declares as growing with its input (a YOLO head's anchors) holds positions, not a
    choice among alternatives: no argmax agreement there. A fixed-size one (classes) gets it."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "W")
    shape = numpy_helper.from_array(np.array([1, 3, 16], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["out"])],
        "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, last_dim])], [weight, shape],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    result = verify(model, perturbed(model, 0.5), feeds(model), atol=None, rtol=None)
    (output,) = result.outputs
    assert (output.argmax_agreement is not None) is has_decisions
    if has_decisions:
        assert 0.0 <= output.argmax_agreement <= 1.0
