"""Output-level errors: each conv's effect on the model's outputs, and the MAC budget allocated on it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from conftest import OPSET
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import dsrewrite
from dsrewrite import lowrank
from dsrewrite.output_effect import NotComparable, OutputProbe, choose_measure, divergence_parts


def two_branch_model(loud: float = 10.0, quiet: float = 0.1, softmax: bool = False) -> onnx.ModelProto:
    """y = loud·conv_a(x) + quiet·conv_b(x): conv_a's errors reach the output 100× louder than conv_b's."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "Wa"),
        numpy_helper.from_array(rng.standard_normal((6, 4, 3, 3)).astype(np.float32), "Wb"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "Ba"),
        # Constant along the last axis, so fold_batchnorm leaves them (and the conv outputs 'a', 'b') alone.
        numpy_helper.from_array(np.full((1, 1, 1, 8), loud, np.float32), "loud"),
        numpy_helper.from_array(np.full((1, 1, 1, 8), quiet, np.float32), "quiet"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["a", "loud"], ["a2"]),
        helper.make_node("Mul", ["b", "quiet"], ["b2"]),
        helper.make_node("Add", ["a2", "b2"], ["sum"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Transpose", ["sum"], ["t"], perm=[0, 2, 3, 1]))
        nodes.append(helper.make_node("Softmax", ["t"], ["y"], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", ["sum"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits), opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def feeds(n=4, seed=0, name="x", shape=(1, 4, 8, 8)):
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def data_free_fit(model, output, rank):
    weight = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}["Wa" if output == "a" else "Wb"]
    bias = np.zeros(6) if output == "b" else {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}["Ba"]
    return lowrank.factorize(lowrank.channel_spectra(weight), rank), bias


@pytest.mark.parametrize("softmax", [False, True])
def test_a_conv_that_moves_the_outputs_more_has_the_larger_error_and_full_rank_none(softmax):
    model = two_branch_model(softmax=softmax)
    probe = OutputProbe.open(model, ["a", "b"], feeds())
    assert [m.kind for m in probe.measures] == (["kl"] if softmax else ["relative_mse"])
    assert len(probe.feeds) == 1, "feeds of a dynamic batch dim run as one batch"
    loud = probe.error({"a": data_free_fit(model, "a", 1)})
    quiet = probe.error({"b": data_free_fit(model, "b", 1)})
    assert loud > 10 * quiet > 0
    assert probe.error({"a": data_free_fit(model, "a", 6), "b": data_free_fit(model, "b", 6)}) < 1e-9
    assert probe.error({}) == 0.0


def test_measures_kl_for_distributions_relative_mse_otherwise():
    p = np.array([[0.2, 0.8], [0.5, 0.5]])
    assert choose_measure("p", [p]).kind == "kl"
    assert choose_measure("logits", [np.log(p)]).kind == "relative_mse"
    measure = choose_measure("p", [p])
    q = np.array([[0.3, 0.7], [0.5, 0.5]])
    expected = 0.2 * math.log(0.2 / 0.3) + 0.8 * math.log(0.8 / 0.7)
    assert divergence_parts(measure, p, q)[0] == pytest.approx(expected)
    with pytest.raises(NotComparable):
        divergence_parts(measure, p, q[:1])


def test_remeasure_sees_the_other_convs_at_their_ranks():
    model = two_branch_model(loud=1.0, quiet=1.0)
    probe = OutputProbe.open(model, ["a", "b"], feeds())
    fits = {key: {r: data_free_fit(model, key, r) for r in (1, 2)} for key in ("a", "b")}
    plans = [_Plan("a", [probe.error({"a": fits["a"][1]}), probe.error({"a": fits["a"][2]}), math.inf]),
             _Plan("b", [probe.error({"b": fits["b"][1]}), probe.error({"b": fits["b"][2]}), math.inf])]  # fmt: skip
    runs = probe.runs
    copies = probe.remeasure(plans, {"a": 1, "b": 1}, fits, width=1)
    assert probe.runs > runs and [p.error_at_rank for p in plans] != [c.error_at_rank for c in copies]
    # Conv a's error at rank 1, with b at rank 1: E(a1, b1) - E(b1).
    expected = probe.error({"a": fits["a"][1], "b": fits["b"][1]}) - probe.error({"b": fits["b"][1]})
    assert copies[0].error_at_rank[0] == pytest.approx(max(expected, 0.0))


class _InContext:
    """A probe stand-in: conv b at rank 1 moves the outputs by 0.2; conv a at rank 3 adds ``added`` to that."""

    originals = {"a": None, "b": None}

    def __init__(self, added: float):
        self.added = added

    def error(self, replaced):
        return 0.2 + (self.added if "a" in replaced else 0.0)


@pytest.mark.parametrize("added, cheaper_ranks", [(0.01, [1.0, 0.5]), (0.2, [2.0, 1.0])])
def test_remeasure_carries_only_compounding_interactions_to_ranks_it_did_not_measure(added, cheaper_ranks):
    """Measured at rank 3 among the others, conv a's error is 0.1× (or 2×) its alone error. Shrinking its unmeasured
    cheaper ranks tenfold would make them look cheap without evidence; growing them is what compounding means."""
    fits = {"a": {1: "a1", 2: "a2", 3: "a3"}, "b": {1: "b1"}}
    plans = [_Plan("a", [1.0, 0.5, 0.1]), _Plan("b", [0.3])]
    copies = OutputProbe.remeasure(_InContext(added), plans, {"a": 3, "b": 1}, fits, width=0)
    assert copies[0].error_at_rank[2] == pytest.approx(added)  # measured: E(a3, b1) - E(b1)
    assert copies[0].error_at_rank[:2] == pytest.approx(cheaper_ranks)


def test_the_first_allocation_is_kept_when_the_remeasured_one_moves_the_outputs_more(monkeypatch):
    from dsrewrite.measure import OutputLevel

    def swapped_curves(self, plans, ranks):  # a re-measure that reverses which conv looks loud
        copies = OutputLevel.__dict__["_real_remeasure"](self, plans, ranks)
        a, b = (c for c in copies if c.output in ("a", "b"))
        a.error_at_rank, b.error_at_rank = b.error_at_rank, a.error_at_rank  # equal shapes: the curves swap places
        return copies

    joint = []
    monkeypatch.setattr(OutputLevel, "_real_remeasure", OutputLevel.remeasure, raising=False)
    monkeypatch.setattr(OutputLevel, "remeasure", swapped_curves)
    monkeypatch.setattr(OutputLevel, "joint_error", lambda self, ranks: joint.append(dict(ranks)) or float(len(joint)))
    result = dsrewrite.rewrite(two_branch_model(), target_macs=0.5, calibration=feeds(8), verify=False, latency_aware=False)
    first, final = joint  # the first allocation measured 1.0, the re-measured one 2.0
    assert first != final
    layers = {layer.output: layer.rank for layer in result.report.layers}
    assert layers == first
    assert any("which is kept" in note for note in result.report.notes)


@dataclass
class _Plan:
    """The fields remeasure reads, without a whole LayerPlan."""

    output: str
    error_at_rank: list
    notes: list = field(default_factory=list)


def test_target_macs_with_calibration_allocates_on_the_outputs_and_remeasures():
    result = dsrewrite.rewrite(
        two_branch_model(), target_macs=0.5, calibration=feeds(8), verify=False, latency_aware=False
    )  # fmt: skip
    layers = {layer.output: layer for layer in result.report.layers}
    assert {layer.error_source for layer in layers.values()} == {"model outputs"}
    assert all(layer.layer_error_at_rank is not None for layer in layers.values())
    # The loud conv's errors cost 100× more at the output, so it keeps the higher rank.
    assert (layers["a"].rank or 99) > (layers["b"].rank or 0)
    for layer in layers.values():
        if layer.rewritten:
            assert layer.model_output_error == pytest.approx(layer.error_at_rank[layer.rank - 1])
    notes = " ".join(result.report.notes)
    assert "relative MSE per feature on 'y'" in notes and "re-measured once" in notes and "errors from model outputs" in notes
    data = result.report.data()
    assert all("model_output_error" in layer and "layer_error_at_rank" in layer for layer in data["layers"])

    layer_level = dsrewrite.rewrite(
        two_branch_model(), target_macs=0.5, calibration=feeds(8), verify=False, latency_aware=False, allocate_by="layer"
    )  # fmt: skip
    assert {layer.error_source for layer in layer_level.report.layers} == {"calibration"}
    assert all(layer.model_output_error is None for layer in layer_level.report.layers)


def test_a_model_without_float_outputs_falls_back_to_layer_errors_with_a_note():
    model = two_branch_model()
    model.graph.node.append(helper.make_node("ArgMax", ["y"], ["cls"], axis=1))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("cls", TensorProto.INT64, None))
    result = dsrewrite.rewrite(model, target_macs=0.5, calibration=feeds(8), verify=False, latency_aware=False)
    assert {layer.error_source for layer in result.report.layers} == {"calibration"}
    assert any("cannot be compared" in note and "no float output" in note for note in result.report.notes)
    assert result.report.totals.eligible_macs_ratio <= 0.5


def test_report_views_show_the_output_level_error(tmp_path):
    result = dsrewrite.rewrite(two_branch_model(), target_macs=0.5, calibration=feeds(8), verify=False, latency_aware=False)
    import io  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415

    from dsrewrite.report import render_terminal  # noqa: PLC0415

    buffer = io.StringIO()
    render_terminal(result.report, Console(file=buffer, width=250, no_color=True))
    text = buffer.getvalue()
    assert "model-output err" in text
    for suffix in (".md", ".html"):
        result.report.write(tmp_path / f"r{suffix}")
        assert "model-output err" in (tmp_path / f"r{suffix}").read_text()



def test_allocate_by_is_validated():
    from dsrewrite.errors import UsageError  # noqa: PLC0415

    with pytest.raises(UsageError, match="--allocate-by"):
        dsrewrite.rewrite(two_branch_model(), target_macs=0.5, allocate_by="task", verify=False)


def test_probe_batches_hold_about_batch_bytes_of_inputs(monkeypatch):
    from dsrewrite import calibration
    from dsrewrite.output_effect import _batched

    small = feeds(6)  # 1 KB each: one batch
    assert [b["x"].shape[0] for b in _batched(small, True)] == [6]
    monkeypatch.setattr(calibration, "BATCH_BYTES", 2 * small[0]["x"].nbytes)
    assert [b["x"].shape[0] for b in _batched(small, True)] == [2, 2, 2]
    assert len(_batched(small, False)) == 6


def test_fit_store_keeps_fits_in_files_as_float32_and_removes_them_when_closed():
    from dsrewrite.fit_store import FitStore

    rng = np.random.default_rng(0)
    store = FitStore()
    fits = {}
    for output, groups in (("a", 1), ("b", 2)):
        for rank in (1, 2):
            factors = lowrank.SeparableFactors(rng.standard_normal((4, rank, 9)), rng.standard_normal((6, 4 // groups, rank)), groups, (3, 3))
            bias = rng.standard_normal(6) if output == "a" else None
            store.setdefault(output, {})[rank] = fits.setdefault(output, {})[rank] = (factors, bias)
    assert sorted(store) == ["a", "b"] and sorted(store["a"]) == [1, 2] and store.get("c") is None
    for output in fits:
        for rank, (factors, bias) in fits[output].items():
            got, got_bias = store[output][rank]
            assert got.depthwise.dtype == np.float32 and (got.groups, got.kernel_shape) == (factors.groups, (3, 3))
            np.testing.assert_array_equal(got.pointwise, factors.pointwise.astype(np.float32))
            assert (got_bias is None) == (bias is None)
    folder = store._folder.name
    assert len(os.listdir(folder)) == 4
    store.close()
    assert not os.path.exists(folder)


def test_a_declared_feature_axis_is_measured_per_feature_so_a_quiet_column_counts():
    # A detection head: 300 anchors x (4 box values of spread ~100, 1 score of spread ~0.1).
    rng = np.random.default_rng(0)
    head = np.concatenate([100 * rng.standard_normal((1, 300, 4)), 0.1 * rng.standard_normal((1, 300, 1))], axis=-1)
    moved = head.copy()
    moved[..., 4] += 0.1 * rng.standard_normal((1, 300))  # the score moves by its whole spread, the boxes not at all
    whole = choose_measure("out", [head])
    assert whole.feature_axis is None  # no declared shape: one relative MSE
    assert divergence_parts(whole, head, moved)[0] / whole.scale < 1e-5
    featured = choose_measure("out", [head], declared=[1, 300, 5], feeds=1)
    assert featured.feature_axis == 2 and len(featured.feature_scales) == 5
    parts = divergence_parts(featured, head, moved) / featured.scales
    assert parts[:4] == pytest.approx(0.0) and parts[4] == pytest.approx(1.0, rel=0.3)
    assert featured.describe() == "relative MSE per feature on 'out' (axis 2, 5 features, mean)"
    assert featured.part_names()[4] == "'out' feature 4 of axis 2"


@pytest.mark.parametrize(
    ("shape", "declared", "axis"),
    [
        ((1, 22, 500), [None, 22, None], 1),  # YOLOv8: [N, 4 + C, anchors]
        ((1, 3549, 6), [1, 3549, 6], 2),  # YOLOX: [1, anchors, 4 + 1 + C]
        ((1, 8, 16, 16), [1, 8, 16, 16], 1),  # a feature map: its channels, not its rows
        ((1, 16, 16, 8), [1, 16, 16, 8], 3),  # the same, channels last
        ((1, 10), [1, 10], None),  # a classifier's logits: one value per class per feed is not a feature
        ((1, 22, 500), [None, None, None], None),  # nothing declared fixed
        ((20, 1, 37), [20, None, 37], None),  # CTC logits [T, N, classes]: too few values per index
    ],
)
def test_the_feature_axis_is_a_declared_fixed_axis_with_many_values_per_index(shape, declared, axis):
    rng = np.random.default_rng(1)
    values = rng.standard_normal(shape)
    if axis is not None:  # indices of the feature axis differ in spread, as a head's columns or a map's channels do
        scale = np.geomspace(0.01, 100, shape[axis]).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        values = values * scale
    assert choose_measure("out", [values], declared=declared, feeds=1).feature_axis == axis


@settings(max_examples=40, deadline=None)
@given(
    features=st.integers(2, 12),
    rows=st.integers(64, 200),
    channels_last=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_per_feature_parts_do_not_depend_on_a_features_units(features, rows, channels_last, scale, seed):
    """Rescaling one feature (say, boxes in pixels instead of in strides) leaves every part as it was; identical
    outputs measure zero."""
    rng = np.random.default_rng(seed)
    shape, axis = ((1, rows, features), 2) if channels_last else ((1, features, rows), 1)
    reference = rng.standard_normal(shape) * rng.uniform(0.1, 10, features).reshape([-1 if a == axis else 1 for a in range(3)])
    candidate = reference + 0.1 * rng.standard_normal(shape)
    declared = list(shape)
    measure = choose_measure("head", [reference], declared, feeds=1)
    assert measure.feature_axis == axis
    parts = divergence_parts(measure, reference, candidate) / measure.scales
    assert np.all(parts > 0)
    assert divergence_parts(measure, reference, reference).sum() == 0.0

    units = np.ones(features)
    units[rng.integers(features)] = scale
    units = units.reshape([-1 if a == axis else 1 for a in range(3)])
    rescaled = choose_measure("head", [reference * units], declared, feeds=1)
    rescaled_parts = divergence_parts(rescaled, reference * units, candidate * units) / rescaled.scales
    np.testing.assert_allclose(rescaled_parts, parts, rtol=1e-9)
