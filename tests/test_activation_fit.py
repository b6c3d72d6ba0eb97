"""Activation-aware fitting: the activation math, the graph patterns, the refinement, and its wiring."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import dsrewrite_cli, run
from onnx import TensorProto, helper, numpy_helper

import dsrewrite
from dsrewrite import activation_fit as af
from dsrewrite import distill, lowrank
from dsrewrite.activation_match import match_activation
from dsrewrite.calibration import RegressionAccumulator, RowSample, positions_per_feed

CHANNELS = 6


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def activated_model(pattern: str, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x (1,4,8,8) -> Conv 3×3 (6 outputs) -> ``pattern`` -> out, plus a second Relu-free branch-free graph."""
    rng = np.random.default_rng(seed)
    inits = [
        _const("w", rng.standard_normal((CHANNELS, 4, 3, 3)) * 0.5),
        _const("b", rng.standard_normal(CHANNELS) * 0.3),
        _const("scale", rng.uniform(0.5, 2.0, (1, CHANNELS, 1, 1))),
        _const("shift", rng.uniform(-1.0, 1.0, (1, CHANNELS, 1, 1))),
        _const("three", 3.0), _const("six", 6.0), _const("zero", 0.0), _const("one", 1.0), _const("half", 0.5),
        _const("root2", math.sqrt(2.0)), _const("beta", 1.5),
        _const("slope", rng.uniform(0.05, 0.3, (CHANNELS, 1, 1))),
    ]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    u = "y"
    if pattern.startswith("affine+"):
        nodes += [helper.make_node("Mul", ["y", "scale"], ["ys"]), helper.make_node("Add", ["ys", "shift"], ["u"])]
        u, pattern = "u", pattern[len("affine+"):]
    if pattern.startswith("bn+"):
        inits += [_const(n, v) for n, v in zip(("g", "be", "mu", "var"), (rng.uniform(0.5, 2, CHANNELS),
                  rng.standard_normal(CHANNELS), rng.standard_normal(CHANNELS), rng.uniform(0.5, 2, CHANNELS)))]  # fmt: skip
        nodes.append(helper.make_node("BatchNormalization", ["y", "g", "be", "mu", "var"], ["u"]))
        u, pattern = "u", pattern[len("bn+"):]
    single = {
        "relu": helper.make_node("Relu", [u], ["out"]),
        "leaky": helper.make_node("LeakyRelu", [u], ["out"], alpha=0.2),
        "prelu": helper.make_node("PRelu", [u, "slope"], ["out"]),
        "relu6": helper.make_node("Clip", [u, "zero", "six"], ["out"]),
        "hardswish": helper.make_node("HardSwish", [u], ["out"]),
        "gelu": helper.make_node("Gelu", [u], ["out"]),
    }
    if pattern in single:
        nodes.append(single[pattern])
    elif pattern == "hardsigmoid_mul":
        nodes += [helper.make_node("HardSigmoid", [u], ["h"], alpha=0.2, beta=0.5), helper.make_node("Mul", [u, "h"], ["out"])]
    elif pattern == "silu":
        nodes += [helper.make_node("Sigmoid", [u], ["s"]), helper.make_node("Mul", [u, "s"], ["out"])]
    elif pattern == "silu_beta":
        nodes += [
            helper.make_node("Mul", [u, "beta"], ["bu"]),
            helper.make_node("Sigmoid", ["bu"], ["s"]),
            helper.make_node("Mul", ["s", u], ["out"]),
        ]
    elif pattern == "hardswish_written":
        nodes += [
            helper.make_node("Add", [u, "three"], ["a"]),
            helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
            helper.make_node("Mul", [u, "c"], ["m"]),
            helper.make_node("Div", ["m", "six"], ["out"]),
        ]
    elif pattern == "gelu_erf":
        nodes += [
            helper.make_node("Div", [u, "root2"], ["d"]),
            helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["e1"]),
            helper.make_node("Mul", [u, "e1"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["out"]),
        ]
    elif pattern == "two_consumers":
        nodes += [helper.make_node("Relu", [u], ["r"]), helper.make_node("Add", [u, "r"], ["out"])]
    elif pattern == "residual":
        nodes += [helper.make_node("Add", [u, "x2"], ["out"])]
    else:
        raise ValueError(pattern)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]
    if pattern == "residual":
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, CHANNELS, 8, 8]))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _match(model):
    graph = gs.import_onnx(model)
    conv = next(n for n in graph.nodes if n.op == "Conv")
    return match_activation(conv, CHANNELS, {t.name for t in graph.outputs})


PATTERNS = [
    ("relu", "relu", 17), ("affine+relu", "relu", 17), ("bn+relu", "relu", 17), ("leaky", "relu", 17),
    ("prelu", "relu", 17), ("affine+relu6", "clip", 17), ("hardswish", "hard_gate", 17),
    ("affine+hardsigmoid_mul", "hard_gate", 17), ("affine+silu", "silu", 17), ("silu_beta", "silu", 17),
    ("affine+hardswish_written", "hard_gate", 17), ("gelu", "gelu", 20), ("affine+gelu_erf", "gelu", 17),
]  # fmt: skip


@pytest.mark.parametrize("pattern,kind,opset", PATTERNS)
def test_each_pattern_is_matched_and_its_forward_is_what_onnxruntime_computes(pattern, kind, opset):
    model = activated_model(pattern, opset=opset)
    act = _match(model)
    assert isinstance(act, af.Activation), act
    assert act.kind == kind
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32) * 2
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    out, y = run(probe, {"x": x})
    channels_last = np.moveaxis(y, 1, -1).astype(np.float64)
    expected = np.moveaxis(out, 1, -1)
    np.testing.assert_allclose(af.activate(act, channels_last), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["two_consumers", "residual"])
def test_no_activation_to_fit_through_gives_a_reason(pattern):
    reason = _match(activated_model(pattern))
    assert isinstance(reason, str) and reason


def test_a_conv_output_that_is_a_graph_output_is_not_fitted_through():
    model = activated_model("relu")
    model.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    assert "graph output" in _match(model)


@pytest.mark.parametrize(
    "act",
    [
        af.Activation("relu", scale=np.array([1.0, -0.5, 0.0, 2.0]), shift=np.array([0.0, 0.3, -0.2, -1.0])),
        af.Activation("relu", slope=0.1),
        af.Activation("clip", low=0.0, high=1.5, scale=np.array([0.7, 1.0, 1.3, 2.0])),
    ],
)
def test_piecewise_z_step_is_the_exact_minimiser(act):
    rng = np.random.default_rng(0)
    y, prediction = rng.standard_normal((50, 4)) * 2, rng.standard_normal((50, 4)) * 2
    lam = 0.3
    z = af.z_step(act, y, prediction, lam)
    grid = np.linspace(-8, 8, 16001)[:, None, None]
    costs = (af.activate(act, grid) - af.activate(act, y)) ** 2 + lam * (grid - prediction) ** 2
    best = costs.min(axis=0)
    achieved = (af.activate(act, z) - af.activate(act, y)) ** 2 + lam * (z - prediction) ** 2
    assert np.all(achieved <= best + 1e-6)


@pytest.mark.parametrize("kind", ["hard_gate", "silu", "gelu", "gelu_tanh"])
def test_smooth_z_step_never_does_worse_than_its_starts(kind):
    act = af.Activation(kind)
    rng = np.random.default_rng(1)
    y, prediction = rng.standard_normal((200, 3)) * 3, rng.standard_normal((200, 3)) * 3
    z = af.z_step(act, y, prediction, 0.05)

    def cost(v):
        return (af.activate(act, v) - af.activate(act, y)) ** 2 + 0.05 * (v - prediction) ** 2

    assert np.all(cost(z) <= np.minimum(cost(y), cost(prediction)) + 1e-12)


@pytest.mark.parametrize("kind", ["hard_gate", "silu", "gelu", "gelu_tanh"])
def test_derivatives_match_finite_differences(kind):
    act = af.Activation(kind)
    u = np.linspace(-5, 5, 101) + 0.013  # off the hard gate's kinks
    numeric = (af.forward(act, u + 1e-6) - af.forward(act, u - 1e-6)) / 2e-6
    np.testing.assert_allclose(af.derivative(act, u), numeric, atol=1e-5)


def test_erf_is_accurate():
    x = np.linspace(-4, 4, 81)
    np.testing.assert_allclose(af.erf(x), [math.erf(v) for v in x], atol=2e-7)


def planted_problem(seed=0, positions=12000, bias_offset=-0.5):
    """y = W x + b on correlated patches; the statistics and a row sample of the same positions."""
    rng = np.random.default_rng(seed)
    n, m, k = 12, 6, 9
    weight = rng.standard_normal((n, m, 3, 3))
    bias = rng.standard_normal(n) + bias_offset
    mixing = rng.standard_normal((k, k)) * np.linspace(1, 0.1, k)
    x = np.einsum("kl,mlp->mkp", mixing, rng.standard_normal((m, k, positions)))
    y = weight.reshape(n, -1) @ x.reshape(-1, positions) + bias[:, None]
    acc = RegressionAccumulator(m, n, k, 1)
    acc.add(x, y)
    sample = RowSample(4000, rng)
    for start in range(0, positions, 2500):
        sample.add(x[:, :, start : start + 2500], y[:, start : start + 2500])
    return weight, bias, acc.finish(), sample, x, y


def test_relu_aware_fit_lowers_the_activated_error_also_off_the_sample():
    weight, bias, stats, sample, x, y = planted_problem()
    act = af.Activation("relu", scale=np.linspace(0.5, 2, 12), shift=np.linspace(-1, 1, 12))
    linear = lowrank.fit_separable(weight, 1, bias, stats, 2, rounds=4)
    fit = af.fit_activated(weight, linear.factors, linear.bias, stats, sample.x, sample.y, act)
    assert fit.improved and fit.error < 0.97 * fit.error_linear
    rows, target = x.reshape(-1, x.shape[2]).T, af.activate(act, y.T)
    on_all = af.activated_error(act, lowrank.dense_weights(fit.factors, fit.bias), rows, target)
    on_all_linear = af.activated_error(act, lowrank.dense_weights(linear.factors, linear.bias), rows, target)
    assert on_all < 0.97 * on_all_linear


def test_without_room_to_improve_the_linear_fit_is_kept_unchanged():
    weight, bias, stats, sample, *_ = planted_problem()
    act = af.Activation("clip", low=-1e6, high=1e6)  # the identity on this data: nothing to gain
    linear = lowrank.fit_separable(weight, 1, bias, stats, 2, rounds=4)
    fit = af.fit_activated(weight, linear.factors, linear.bias, stats, sample.x, sample.y, act)
    if not fit.improved:
        assert fit.factors is linear.factors and fit.bias is linear.bias
    assert fit.error <= fit.error_linear


def test_row_sample_keeps_a_uniform_sample_within_its_capacity():
    rng = np.random.default_rng(0)
    sample = RowSample(500, rng)
    for start in range(0, 20000, 3000):
        ids = np.arange(start, min(start + 3000, 20000), dtype=np.float64)
        sample.add(np.broadcast_to(ids / 20000, (1, 1, len(ids))).copy(), ids[None, :])
    assert sample.x.shape == (500, 1) and sample.y.shape == (500, 1)
    assert sample.x.dtype == np.float16  # in float16's range: half the memory
    np.testing.assert_allclose(sample.x[:, 0], sample.y[:, 0] / 20000, rtol=1e-3)  # rows stay paired
    assert len(np.unique(sample.y)) == 500
    assert 7000 < sample.y.mean() < 13000  # drawn from every batch, not the first ones
    assert sample.nbytes == 500 * (2 + 4)
    assert RowSample.rows_within(64, 64, 9, 2**20, 10**6) == 2**20 // (4 * (64 * 9 + 64))
    # Exactly the positions with the 500 smallest keys (the same generator draws them batch by batch).
    replay = np.random.default_rng(0)
    keys = np.concatenate([replay.random(min(3000, 20000 - start)) for start in range(0, 20000, 3000)])
    assert set(sample.y[:, 0].astype(int)) == set(np.argsort(keys)[:500])


def test_row_sample_widens_to_float32_when_a_value_leaves_float16s_range():
    sample = RowSample(10, np.random.default_rng(0))
    sample.add(np.full((1, 1, 4), 0.5), np.arange(4.0)[None, :])
    assert sample.x.dtype == np.float16
    sample.add(np.full((1, 1, 4), 1e6), np.arange(4.0, 8.0)[None, :])
    assert sample.x.dtype == np.float32
    by_id = dict(zip(sample.y[:, 0].astype(int), sample.x[:, 0]))
    assert [by_id[i] for i in range(8)] == [0.5] * 4 + [1e6] * 4


def test_the_wave_memory_cap_bounds_the_sample_or_skips_with_a_reason(monkeypatch, tmp_path):
    model = activated_model("affine+relu")
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8, 8)).astype(np.float32)} for i in range(8)]
    monkeypatch.setattr(distill, "ACTIVATION_SAMPLE_BYTES", 100 * 4 * (4 * 9 + CHANNELS))
    result = dsrewrite.rewrite(model, rank=1, calibration=feeds, verify=False, benchmark=False)
    layer = next(p for p in result.report.layers if p.rewritten)
    assert layer.fit_target == "linear" and layer.activated_error is None
    assert any("memory cap" in n for n in layer.notes)


def test_default_fit_is_activation_aware_and_linear_fit_opts_out():
    model = activated_model("affine+relu", seed=3)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8, 8)).astype(np.float32)} for i in range(16)]
    folded = dsrewrite.rewrite(model, rank=1, calibration=feeds, verify=False, benchmark=False)
    assert next(p for p in folded.report.layers if p.rewritten).activation == "Relu"  # the Mul·Add folded into the conv
    # Unfolded, the fit reaches the activation through the affine ops.
    aware = dsrewrite.rewrite(model, rank=1, calibration=feeds, verify=False, benchmark=False, fold_batchnorm=False)
    layer = next(p for p in aware.report.layers if p.rewritten)
    assert layer.activation == "Mul·Add → Relu"
    assert layer.activated_error is not None and layer.activated_error_linear is not None
    assert layer.activated_error <= layer.activated_error_linear
    assert layer.fit_target in ("activated", "linear")
    linear = dsrewrite.rewrite(model, rank=1, calibration=feeds, verify=False, benchmark=False, linear_fit=True, fold_batchnorm=False)
    plain = next(p for p in linear.report.layers if p.rewritten)
    assert plain.fit_target == "linear" and plain.activated_error is None and "activation-aware" not in plain.fit


def test_full_rank_with_an_activation_stays_exact():
    model = activated_model("affine+relu")
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8, 8)).astype(np.float32)} for i in range(8)]
    result = dsrewrite.rewrite(model, rank="full", calibration=feeds, atol=1e-4, rtol=1e-4, benchmark=False)
    assert result.verification.passed
    layer = next(p for p in result.report.layers if p.rewritten)
    assert layer.fit_target == "linear" and any("full rank" in n for n in layer.notes)


def test_cli_linear_fit_flag(tmp_model, tmp_path):
    path = tmp_model(activated_model("affine+relu"))
    feeds = tmp_path / "calib.npz"
    np.savez(feeds, x=np.random.default_rng(0).standard_normal((8, 1, 4, 8, 8)).astype(np.float32))
    out = tmp_path / "out.onnx"
    code, _, err = dsrewrite_cli(path, "-o", out, "--rank", "1", "--calibration", feeds, "--linear-fit", "--no-benchmark", "-q")
    assert code == 0, err
    assert out.exists()


def test_positions_per_feed_hold_their_total_beyond_the_reference_feeds():
    per_feed = [positions_per_feed(576, 1, feeds) for feeds in (1, 64, 256, 1024)]
    assert per_feed[0] == per_feed[1]
    assert per_feed[1] * 64 == pytest.approx(per_feed[2] * 256) == pytest.approx(per_feed[3] * 1024)
