"""The output guard: all the fitted rewrites at once may move the model's outputs by at most a bound."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import dsrewrite_cli, run
from test_output_effect import feeds, two_branch_model

import dsrewrite
from dsrewrite.errors import UsageError
from dsrewrite.output_guard import GUARD_FEEDS, PART_FLOOR, admission_order, int8_part_bounds, savings
from dsrewrite.plan import LayerPlan


def relative_mse(original, rewritten, data) -> float:
    """The guard's own measure, computed independently: both models run in onnxruntime on ``data``.

    The rewrite declares y's shape [n, 6, 8, 8] (shape inference fills it), so the measure is relative MSE per
    channel, averaged over the six channels.
    """
    references = np.concatenate([run(original, feed)[0] for feed in data]).astype(np.float64)
    got = np.concatenate([run(rewritten, feed)[0] for feed in data]).astype(np.float64)
    per_channel = ((got - references) ** 2).sum(axis=(0, 2, 3)) / ((references - references.mean(axis=(0, 2, 3), keepdims=True)) ** 2).sum(axis=(0, 2, 3))
    return float(per_channel.mean())


def guarded(bound, **options):
    model = two_branch_model()
    result = dsrewrite.rewrite(model, rank=1, calibration=feeds(8), max_output_error=bound, latency_aware=False, **options)
    return model, result, {layer.node: layer for layer in result.report.layers}


def test_admission_order_is_error_per_saving_and_a_conv_that_saves_nothing_comes_last():
    alone = {"a": 0.4, "b": 0.1, "c": 0.1, "d": 0.0}
    saved = {"a": 4.0, "b": 0.5, "c": 2.0, "d": 0.0}
    assert admission_order(alone, saved) == ["c", "a", "b", "d"]  # 0.05, 0.1, 0.2 per unit; d saves nothing


def test_under_int8_each_part_is_bounded_by_int8s_error_on_it_but_not_below_a_floor():
    # The YOLOX-style head's columns under INT8 (16 feeds): x, y, w, h, objectness, class; their mean 0.247.
    int8 = np.array([0.4301, 0.4481, 0.1440, 0.1089, 0.0529, 0.2984])
    bounds = int8_part_bounds(int8, float(int8.mean()))
    np.testing.assert_array_equal(bounds, int8)  # no column is under a tenth of the mean
    # A part INT8 leaves almost untouched gets the floor, not its own near-zero error.
    bounds = int8_part_bounds(np.array([0.2, 1e-9]), 0.1)
    np.testing.assert_allclose(bounds, [0.2, PART_FLOOR * 0.1])


def test_savings_are_in_one_unit_for_every_conv():
    def plan(output, **kw):
        base = dict(node=output, op="Conv", status="rewritten", reason=None, rank=1, form=None, kernel=[3, 3],
                    in_channels=4, out_channels=4, group=1, macs_before=100, macs_after=40, params_before=1,
                    params_after=1, output=output)  # fmt: skip
        return LayerPlan(**{**base, **kw})

    timed = [plan("a", in_model_before_ms=2.0, in_model_after_ms=1.5), plan("b", in_model_before_ms=1.0, in_model_after_ms=0.25)]
    assert savings(timed) == ({"a": 0.5, "b": 0.75}, "ms in the model")
    partly = [timed[0], plan("b")]  # one conv was not timed: MACs for both rather than mixed units
    assert savings(partly) == ({"a": 60.0, "b": 60.0}, "MACs")


def test_a_bound_between_the_two_convs_keeps_the_quiet_one_and_reverts_the_loud_one():
    # conv_a's errors reach the output 100x louder than conv_b's: at rank 1 only conv_b fits a middling bound.
    model, loose, _ = guarded(1e9)
    assert loose.report.output_guard["reverted"] == []
    everything = loose.report.output_guard["error_all_rewrites"]
    model, result, layers = guarded(everything / 10)
    record = result.report.output_guard
    assert record["bound_source"] == "--max-output-error" and record["feeds"] == min(GUARD_FEEDS, 8)
    assert record["reverted"] == ["conv_a"]
    assert layers["conv_a"].status == "skipped" and "output guard" in layers["conv_a"].reason
    assert layers["conv_a"].output_error is None and layers["conv_a"].rank is None
    assert layers["conv_b"].status == "rewritten"
    assert 0 < record["error_kept"] <= everything / 10
    # Honest: the kept error is what the delivered model does on the calibration feeds.
    assert math.isclose(relative_mse(model, result.model, feeds(8)), record["error_kept"], rel_tol=1e-3)
    assert any(note.startswith("output guard (relative MSE per feature on 'y' (axis 1, 6 features") for note in result.report.notes)
    assert result.report.data()["output_guard"]["error_kept"] == pytest.approx(record["error_kept"])


def test_a_bound_nothing_fits_leaves_the_model_as_it_was():
    model, result, layers = guarded(1e-12)
    assert sorted(result.report.output_guard["reverted"]) == ["conv_a", "conv_b"]
    assert result.report.output_guard["error_kept"] == 0.0
    assert all(layer.status == "skipped" for layer in layers.values())
    data = feeds(2, seed=5)
    for feed in data:
        np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_no_bound_no_guard_and_inf_turns_the_quantized_default_off():
    _, result, _ = guarded(None)
    assert result.report.output_guard is None and "output_guard" not in result.report.data()
    _, result, _ = guarded(math.inf)
    assert result.report.output_guard is None


def test_under_int8_the_bound_is_int8s_own_error():
    _, result, _ = guarded(None, quantize="int8")
    record = result.report.output_guard
    assert record is not None and record["bound_source"] == "INT8 without rewrite"
    assert 0 < record["bound"] < 1
    assert record["error_kept"] <= record["bound"]


@pytest.mark.parametrize("bound", [0, -1.0, float("nan"), "0.1", True])
def test_the_bound_is_validated(bound):
    with pytest.raises(UsageError, match="--max-output-error"):
        dsrewrite.rewrite(two_branch_model(), rank=1, calibration=feeds(2), max_output_error=bound)


def test_the_bound_needs_calibration_data(tmp_model):
    with pytest.raises(UsageError, match="--max-output-error needs --calibration"):
        dsrewrite.rewrite(two_branch_model(), rank=1, max_output_error=0.1)
    code, out, err = dsrewrite_cli(tmp_model(two_branch_model()), "--dry-run", "--rank", "1", "--max-output-error", "0.1")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: --max-output-error needs --calibration data: the outputs are compared on it"]


def test_under_a_mac_budget_the_guard_ranks_by_the_allocations_output_level_errors():
    model = two_branch_model()
    options = dict(rank=1, target_macs=0.6, calibration=feeds(8), latency_aware=False)
    free = dsrewrite.rewrite(model, **options)
    assert {layer.node for layer in free.report.layers if layer.rewritten} == {"conv_a", "conv_b"}
    everything = {layer.node: layer.model_output_error for layer in free.report.layers}
    assert everything["conv_a"] > 10 * everything["conv_b"] > 0
    # The bound holds per channel of y: a conv's worst channel moves by at least its mean over the 6 channels and
    # at most 6 times that, so this bound keeps conv_b (within 12x its mean) and not conv_a (over 10x conv_b's mean).
    bound = 12 * everything["conv_b"]
    assert everything["conv_a"] > bound
    result = dsrewrite.rewrite(model, **options, max_output_error=bound)
    assert result.report.output_guard["reverted"] == ["conv_a"]
    assert result.report.output_guard["error_kept"] <= bound
    assert any("MAC budget" in note or "--target-macs" in note for note in result.report.notes)


def test_a_dry_run_says_the_guard_would_run_after_the_fit():
    result = dsrewrite.rewrite(two_branch_model(), rank=1, calibration=feeds(4), max_output_error=1e-9, dry_run=True)
    assert result.report.output_guard is None
    assert any(note.startswith("dry run: the output guard runs after the fit") for note in result.report.notes)


def test_a_model_without_float_outputs_keeps_its_rewrites_and_says_the_guard_could_not_compare():
    from onnx import TensorProto, helper

    model = two_branch_model()
    model.graph.node.append(helper.make_node("ArgMax", ["y"], ["cls"], axis=1))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("cls", TensorProto.INT64, None))
    result = dsrewrite.rewrite(model, rank=1, calibration=feeds(4), max_output_error=1e-9, verify=False, latency_aware=False)
    assert result.report.output_guard is None
    assert all(layer.rewritten for layer in result.report.layers)
    assert any(note.startswith("output guard skipped: the model's outputs cannot be compared") for note in result.report.notes)
    assert any(w.startswith("output guard skipped") and w.endswith("every rewrite was kept") for w in result.warnings)


def head_model() -> onnx.ModelProto:
    """y = Concat(conv_a(x), conv_b(x)) on channels, [n, 30, 8, 8]: conv_a (24 channels) is exactly rank 1 per input
    channel, so only conv_b's 6 channels move under a rank-1 rewrite."""
    from conftest import OPSET
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    rank_one = rng.standard_normal((24, 4, 1, 1)) * rng.standard_normal((1, 4, 3, 3))
    inits = [numpy_helper.from_array(rank_one.astype(np.float32), "Wa"),
             numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "Wb")]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["a", "b"], ["y"], axis=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 30, 8, 8])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_the_bound_holds_for_every_feature_not_only_for_their_mean():
    options = dict(rank=1, calibration=feeds(8), latency_aware=False)
    loose = dsrewrite.rewrite(head_model(), **options, max_output_error=1e9).report.output_guard
    assert loose["measure"] == "relative MSE per feature on 'y' (axis 1, 30 features, mean)"
    worst = loose["worst_part"]
    assert worst["part"] in {f"'y' feature {i} of axis 1" for i in range(24, 30)}  # one of conv_b's channels
    mean, highest = loose["error_all_rewrites"], worst["error"]
    assert mean < highest / 4  # 24 of the 30 channels do not move
    bound = (mean + highest) / 2  # over the mean, under the worst channel
    result = dsrewrite.rewrite(head_model(), **options, max_output_error=bound)
    record = result.report.output_guard
    assert record["reverted"] == ["conv_b"]
    layers = {layer.node: layer for layer in result.report.layers}
    assert layers["conv_a"].rewritten and not layers["conv_b"].rewritten
    assert "moved 'y' feature" in layers["conv_b"].reason and "over its bound" in layers["conv_b"].reason
    assert record["error_kept"] < 1e-6
    assert any("over its bound" in note for note in result.report.notes)


def sliced_model() -> onnx.ModelProto:
    """y = Concat(conv_a(x), conv_b(x)[:, :1]), [n, 7, 8, 8]: two convs of one shape, each near rank 1 per input
    channel; conv_a moves its six channels a little each, conv_b the one channel of it that reaches y a lot."""
    from conftest import OPSET
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)

    def kernel(noise: float) -> np.ndarray:
        rank_one = rng.standard_normal((6, 4, 1, 1)) * rng.standard_normal((1, 4, 3, 3))
        return (rank_one + noise * rng.standard_normal((6, 4, 3, 3))).astype(np.float32)

    inits = [numpy_helper.from_array(kernel(0.3), "Wa"), numpy_helper.from_array(kernel(1.0), "Wb")]
    inits += [numpy_helper.from_array(np.array([v]), name) for name, v in (("start", 0), ("end", 1), ("axis", 1))]
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Slice", ["b", "start", "end", "axis"], ["b0"]),
        helper.make_node("Concat", ["a", "b0"], ["y"], axis=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 7, 8, 8])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", OPSET)])  # fmt: skip
    model.ir_version = 8
    return model


def test_with_several_parts_a_conv_is_ranked_by_the_share_of_a_parts_bound_it_uses():
    options = dict(rank=1, calibration=feeds(8), latency_aware=False)
    alone = {}
    for conv in ("conv_a", "conv_b"):
        record = dsrewrite.rewrite(sliced_model(), **options, include=[conv], max_output_error=1e9).report.output_guard
        alone[conv] = record["error_all_rewrites"], record["worst_part"]["error"]
    (mean_a, worst_a), (mean_b, worst_b) = alone["conv_a"], alone["conv_b"]
    # By the mean, conv_b is the cheaper of two convs that save the same: ranked first, its one channel over the
    # bound would fail the first prefix and leave both convs alone. By the share of the bound, conv_a comes first.
    assert mean_b < mean_a and worst_a < worst_b
    bound = (worst_a + worst_b) / 2
    result = dsrewrite.rewrite(sliced_model(), **options, max_output_error=bound)
    record = result.report.output_guard
    assert record["reverted"] == ["conv_b"]
    layers = {layer.node: layer for layer in result.report.layers}
    assert layers["conv_a"].rewritten
    assert "of a part's bound" in layers["conv_b"].reason
    assert 0 < record["error_kept"] and record["worst_part"]["part"] == "'y' feature 6 of axis 1"
