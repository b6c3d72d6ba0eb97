"""Fitting at a following depthwise conv's output: the composition math, the graph pattern, and the wiring."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import dsrewrite
from dsrewrite import composed_fit as cf
from dsrewrite import distill
from dsrewrite.calibration import RegressionAccumulator, extract_patches
from dsrewrite.geometry import ConvGeometry
from dsrewrite.graph import ConvSpec, convs_by_output
from dsrewrite.following_depthwise import FollowingDepthwise, match_following_depthwise


def _conv(x: np.ndarray, weight: np.ndarray, geometry: ConvGeometry, group: int = 1) -> np.ndarray:
    """Reference conv through im2col: ``x (B, M, *s)``, ``weight (N, M/g, *k)`` -> ``(B, N, *out)``."""
    b, m = x.shape[:2]
    n = weight.shape[0]
    out = geometry.output_spatial(x.shape[2:])
    patches = extract_patches(x, geometry)  # (M, K, B·P)
    k = patches.shape[1]
    patches = patches.reshape(group, m // group, k, b, -1)
    w = weight.reshape(group, n // group, m // group, k)
    y = np.einsum("gnck,gckbp->bgnp", w, patches).reshape(b, n, *out)
    return y


@settings(max_examples=25, deadline=None)
@given(
    stride1=st.integers(1, 2), stride2=st.integers(1, 2), dilation1=st.integers(1, 2), dilation2=st.integers(1, 2),
    kernel1=st.sampled_from([(3, 3), (1, 3), (5, 5)]), kernel2=st.sampled_from([(3, 3), (3, 1)]),
    pad1=st.integers(0, 2), pad2=st.integers(0, 1), seed=st.integers(0, 100),
)  # fmt: skip
def test_the_composed_kernel_reproduces_the_two_convs_away_from_borders(
    stride1, stride2, dilation1, dilation2, kernel1, kernel2, pad1, pad2, seed
):
    rng = np.random.default_rng(seed)
    m, n = 3, 4
    first = ConvGeometry(kernel1, (stride1,) * 2, (pad1, pad1 + 1, pad1, pad1), (dilation1,) * 2)
    second = ConvGeometry(kernel2, (stride2,) * 2, (pad2,) * 4, (dilation2,) * 2)
    x = rng.standard_normal((2, m, 23, 26))
    weight = rng.standard_normal((n, m, *kernel1))
    filters = rng.standard_normal((n, *kernel2))
    y = _conv(x, weight, first)
    if min(y.shape[2:]) < 1 or any(v < 1 for v in second.output_spatial(y.shape[2:])):
        return
    z = _conv(y, filters[:, None], second, group=n)

    geometry, y_spatial, z_spatial = cf.composed_geometry(first, second, x.shape[2:])
    assert list(y.shape[2:]) == y_spatial and list(z.shape[2:]) == z_spatial
    interior = cf.interior_positions(second, y_spatial, z_spatial, x.shape[0])
    if interior.size == 0:
        return
    patches = extract_patches(x, geometry, cf.to_composed_positions(interior, z_spatial, geometry.output_spatial(x.shape[2:])))
    operator = cf.composition_operator(first, kernel1, second, filters)
    composed = np.einsum("ouk,ock->ocu", operator, weight.reshape(n, m, -1))  # (N, M, Kc)
    predicted = np.einsum("ocu,cup->op", composed, patches)
    expected = z.transpose(1, 0, 2, 3).reshape(n, -1)[:, interior]
    np.testing.assert_allclose(predicted, expected, rtol=1e-9, atol=1e-9)


def test_interior_positions_exclude_exactly_the_padded_reads():
    second = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    inside = cf.interior_positions(second, [5, 6], [5, 6], 2)
    grid = np.zeros((2, 5, 6), dtype=bool)
    grid.reshape(-1)[inside] = True
    expected = np.zeros((2, 5, 6), dtype=bool)
    expected[:, 1:4, 1:5] = True
    np.testing.assert_array_equal(grid, expected)


def _problem(seed: int, n: int = 8, m: int = 3, samples: int = 4000):
    """Composed statistics of a 3×3 stride-2 conv followed by a 3×3 depthwise conv with filters of unequal gain."""
    rng = np.random.default_rng(seed)
    first = ConvGeometry((3, 3), (2, 2), (1, 1, 1, 1), (1, 1))
    second = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    weight = rng.standard_normal((n, m, 3, 3))
    bias = rng.standard_normal(n)
    filters = rng.standard_normal((n, 3, 3)) * np.exp(rng.standard_normal((n, 1, 1)))
    operator = cf.composition_operator(first, (3, 3), second, filters)
    gain, offset = filters.reshape(n, -1).sum(axis=1), rng.standard_normal(n)
    taps = operator.shape[1]
    mix = rng.standard_normal((m * taps, m * taps)) / np.sqrt(m * taps)  # correlated inputs
    x = (rng.standard_normal((samples, m * taps)) @ mix).T.reshape(m, taps, samples)
    composed = np.einsum("ouk,ock->ocu", operator, weight.reshape(n, m, -1)).reshape(n, -1)
    t = composed @ x.reshape(m * taps, samples) + (gain * bias + offset)[:, None]
    accumulator = RegressionAccumulator(m, n, taps, 1)
    accumulator.add(x, t)
    return weight, bias, accumulator.finish(), operator, gain, offset


def test_full_rank_is_exact():
    weight, bias, stats, operator, gain, offset = _problem(0)
    fit = cf.fit_through(weight, bias, stats, 9, operator, gain, offset)
    assert fit.squared_error / stats.centred_energy < 1e-8
    np.testing.assert_allclose(dsrewrite.lowrank.reconstruct(fit.factors), weight, atol=1e-6)
    np.testing.assert_allclose(fit.bias, bias, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_the_fit_improves_on_the_svd_and_on_fitting_the_conv_alone(rank):
    weight, bias, stats, operator, gain, offset = _problem(1)
    fit = cf.fit_through(weight, bias, stats, rank, operator, gain, offset)
    assert fit.squared_error < 0.9 * fit.data_free_error
    # The plain SVD factors are the best fit of the conv's own kernel on white inputs; the composed error of
    # any start is an upper bound for the converged fit, including one round only.
    one_round = cf.fit_through(weight, bias, stats, rank, operator, gain, offset, rounds=1)
    assert fit.squared_error <= one_round.squared_error * (1 + 1e-9)


def test_a_bias_that_does_not_reach_the_target_keeps_its_value():
    weight, bias, stats, operator, gain, offset = _problem(2)
    gain = gain.copy()
    gain[0] = 0.0  # a filter that sums to zero: the conv's bias on channel 0 has no effect there
    fit = cf.fit_through(weight, bias, stats, 1, operator, gain, offset)
    assert fit.bias[0] == pytest.approx(bias[0])
    assert np.all(np.isfinite(fit.bias))


# -- the graph pattern and the wiring ----------------------------------------------------------------


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def stem_model(between: str = "mul", multiplier: int = 1, consumers: int = 1, seed: int = 0, auto_pad: bool = False):
    """x (1,3,32,40) -> Conv 3×3 s2 (3→8) -> ``between`` -> depthwise Conv 3×3 -> Relu -> out."""
    rng = np.random.default_rng(seed)
    n = 8
    inits = [
        _const("w", rng.standard_normal((n, 3, 3, 3)) * 0.3),
        _const("b", rng.standard_normal(n)),
        _const("scale", rng.uniform(0.5, 2.0, (1, n, 1, 1))),
        _const("shift", rng.uniform(-1.0, 1.0, (1, n, 1, 1))),
        _const("h", rng.standard_normal((n * multiplier, 1, 3, 3)) * np.exp(rng.standard_normal((n * multiplier, 1, 1, 1)))),
        _const("hb", rng.standard_normal(n * multiplier)),
    ]
    pads = {"auto_pad": "SAME_UPPER"} if auto_pad else {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2], name="stem", **pads)]
    u = "y"
    if between == "mul":
        nodes += [helper.make_node("Mul", ["y", "scale"], ["ys"]), helper.make_node("Add", ["ys", "shift"], ["u"])]
        u = "u"
    elif between == "relu":
        nodes.append(helper.make_node("Relu", ["y"], ["u"]))
        u = "u"
    nodes.append(helper.make_node("Conv", [u, "h", "hb"], ["z"], group=n, pads=[1, 1, 1, 1], name="dw"))
    nodes.append(helper.make_node("Relu", ["z"], ["out"]))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    if consumers == 2:
        nodes.append(helper.make_node("Sigmoid", [u], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 40])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _match(model):
    graph = gs.import_onnx(model)
    node = convs_by_output(graph)["y"]
    return match_following_depthwise(node, ConvSpec.from_node(node, graph, {}), {t.name for t in graph.outputs})


def test_the_pattern_is_found_through_per_channel_affine_ops():
    found = _match(stem_model("mul"))
    assert isinstance(found, FollowingDepthwise) and found.node == "dw" and found.output == "z"
    assert found.operator.shape == (8, 49, 9)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"between": "relu"}, "feeds Relu"),
        ({"multiplier": 2}, "one filter per channel"),
        ({"consumers": 2}, "2 consumers"),
    ],
)
def test_no_pattern_where_the_map_is_not_linear_or_not_depthwise(kwargs, reason):
    found = _match(stem_model(**kwargs))
    assert isinstance(found, str) and reason in found


def _feeds(seed, count):
    rng = np.random.default_rng(seed)
    grey = lambda: np.repeat(rng.standard_normal((1, 1, 32, 40)), 3, axis=1) + 0.3 * rng.standard_normal((1, 3, 32, 40))  # noqa: E731
    return [{"x": grey().astype(np.float32)} for _ in range(count)]


def _output_nmse(original, rewritten, feeds):
    a_session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    b_session = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    num = den = 0.0
    for feed in feeds:
        a, b = a_session.run(["out"], feed)[0], b_session.run(["out"], feed)[0]
        num += float(((a - b) ** 2).sum())
        den += float(((a - a.mean()) ** 2).sum())
    return num / den


@pytest.mark.parametrize("auto_pad", [False, True])
def test_full_rank_through_the_depthwise_conv_reproduces_the_model(auto_pad):
    model = stem_model("mul", auto_pad=auto_pad)
    result = dsrewrite.rewrite(model, rank="full", calibration=_feeds(0, 8), benchmark=False)
    layer = next(p for p in result.report.layers if p.node == "stem")
    assert layer.fit_target == "after-depthwise"
    assert result.verification.passed
    assert _output_nmse(model, result.model, _feeds(1, 4)) < 1e-9


def test_rank_1_fitted_at_the_depthwise_output_beats_the_conv_alone(monkeypatch):
    model = stem_model("mul")
    calibration, held_out = _feeds(2, 24), _feeds(3, 8)
    through = dsrewrite.rewrite(model, rank=1, calibration=calibration, benchmark=False, verify=False)
    layer = next(p for p in through.report.layers if p.node == "stem")
    assert layer.fit_target == "after-depthwise" and layer.activation is None
    assert any("depthwise conv that follows (dw)" in note for note in layer.notes)
    assert layer.output_error < layer.output_error_data_free
    alone = dsrewrite.rewrite(model, rank=1, calibration=calibration, benchmark=False, verify=False, linear_fit=True)
    assert next(p for p in alone.report.layers if p.node == "stem").fit_target == "linear"
    assert _output_nmse(model, through.model, held_out) < 0.8 * _output_nmse(model, alone.model, held_out)


def test_problems_over_the_work_cap_keep_the_plain_fit(monkeypatch):
    monkeypatch.setattr(distill, "MAX_WORK", 0)
    result = dsrewrite.rewrite(stem_model("mul"), rank=1, calibration=_feeds(4, 8), benchmark=False, verify=False)
    assert next(p for p in result.report.layers if p.node == "stem").fit_target == "linear"


def test_error_curves_and_allocation_use_the_composed_fit(monkeypatch):
    ranks = []
    original = distill.fit_through

    def counting(*args, **kwargs):
        ranks.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(distill, "fit_through", counting)
    result = dsrewrite.rewrite(
        stem_model("mul"), target_macs=0.5, calibration=_feeds(5, 8), latency_aware=False, benchmark=False, verify=False
    )
    layer = next(p for p in result.report.layers if p.node == "stem")
    assert set(range(1, 4)) <= set(ranks)  # the curve: every rank that saves MACs (3→8, 3×3: ranks 1..3)
    assert layer.rewritten and layer.fit_target == "after-depthwise"


def _pair_model(kernel, stride, dilation, stride2, dilation2, spatial):
    """x (1,3,*spatial) -> Conv (3→6) -> Mul -> depthwise Conv -> Relu; 1-D or 2-D."""
    rng = np.random.default_rng(sum(kernel) + stride + 7 * dilation)
    d = len(spatial)
    inits = [
        _const("w", rng.standard_normal((6, 3, *kernel)) * 0.3), _const("b", rng.standard_normal(6)),
        _const("scale", rng.uniform(0.5, 2.0, (1, 6) + (1,) * d)),
        _const("h", rng.standard_normal((6, 1) + (3,) * d)), _const("hb", rng.standard_normal(6)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[stride] * d, dilations=[dilation] * d,
                         pads=[1] * d + [2] * d, name="stem"),
        helper.make_node("Mul", ["y", "scale"], ["u"]),
        helper.make_node("Conv", ["u", "h", "hb"], ["z"], group=6, strides=[stride2] * d, dilations=[dilation2] * d,
                         pads=[1] * (2 * d), name="dw"),
        helper.make_node("Relu", ["z"], ["out"]),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *spatial])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=12, deadline=None)
@given(
    kernel=st.sampled_from([(3, 3), (1, 3), (5, 5), (3,), (5,)]), stride=st.integers(1, 2), dilation=st.integers(1, 2),
    stride2=st.integers(1, 2), dilation2=st.integers(1, 2),
)  # fmt: skip
def test_full_rank_is_exact_for_any_pair_geometry(kernel, stride, dilation, stride2, dilation2):
    spatial = (20, 24)[: len(kernel)] if len(kernel) == 2 else (40,)
    model = _pair_model(kernel, stride, dilation, stride2, dilation2, spatial)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, *spatial)).astype(np.float32)} for _ in range(6)]
    result = dsrewrite.rewrite(model, rank="full", calibration=feeds, benchmark=False)
    layer = next(p for p in result.report.layers if p.node == "stem")
    assert layer.fit_target == "after-depthwise"
    assert result.verification.passed


def test_a_later_wave_is_fitted_through_its_depthwise_conv_on_spilled_targets():
    """conv A → Relu → conv B → Mul → depthwise → Relu: B is in wave 1, its targets come from the first pass."""
    rng = np.random.default_rng(3)
    inits = [
        _const("wa", rng.standard_normal((8, 3, 3, 3)) * 0.3), _const("wb", rng.standard_normal((8, 8, 3, 3)) * 0.2),
        _const("scale", rng.uniform(0.5, 2.0, (1, 8, 1, 1))), _const("h", rng.standard_normal((8, 1, 3, 3))),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], name="A"),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "wb"], ["b"], pads=[1, 1, 1, 1], strides=[2, 2], name="B"),
        helper.make_node("Mul", ["b", "scale"], ["u"]),
        helper.make_node("Conv", ["u", "h"], ["z"], group=8, pads=[1, 1, 1, 1], name="dw"),
        helper.make_node("Relu", ["z"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 40])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    full = dsrewrite.rewrite(model, rank="full", calibration=_feeds(6, 8), benchmark=False)
    assert full.verification.passed
    assert {p.node: p.fit_target for p in full.report.layers if p.rewritten}["B"] == "after-depthwise"
    low = dsrewrite.rewrite(model, rank=1, calibration=_feeds(6, 16), benchmark=False, verify=False)
    layers = {p.node: p for p in low.report.layers}
    assert layers["A"].fit_target == "activated" or layers["A"].fit_target == "linear"
    assert layers["B"].fit_target == "after-depthwise" and layers["B"].output_error < layers["B"].output_error_data_free


def test_feeds_of_different_sizes_and_a_depthwise_output_that_is_a_graph_output():
    model = stem_model("mul")
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "w"
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    rng = np.random.default_rng(7)
    feeds = [{"x": rng.standard_normal((1, 3, h, w)).astype(np.float32)} for h, w in [(32, 40), (24, 56)] * 6]
    result = dsrewrite.rewrite(model, rank=1, calibration=feeds, benchmark=False, verify=False, input_shapes={"x": (1, 3, 32, 40)})
    layer = next(p for p in result.report.layers if p.node == "stem")
    assert layer.fit_target == "after-depthwise" and layer.output_error < layer.output_error_data_free
    full = dsrewrite.rewrite(model, rank="full", calibration=feeds, benchmark=False, input_shapes={"x": (1, 3, 32, 40)})
    assert full.verification.passed


def test_a_conv_the_output_guard_leaves_alone_keeps_no_note_of_its_fit():
    result = dsrewrite.rewrite(stem_model("mul"), rank=1, calibration=_feeds(8, 16), max_output_error=1e-9,
                               benchmark=False, latency_aware=False, verify=False)  # fmt: skip
    layer = next(p for p in result.report.layers if p.node == "stem")
    assert not layer.rewritten and layer.fit_target is None
    assert not any(note.startswith("fitted at the output of") for note in layer.notes)
