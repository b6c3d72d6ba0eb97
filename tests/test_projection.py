"""The input-projected rewrite of few-channel convs: its fit, its emission, and where the decisions offer it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import conv_model, run
from onnx import numpy_helper

from dsrewrite import lowrank
from dsrewrite.lowrank import RegressionStats
from dsrewrite.projection import can_project, data_free_projected, fit_projected


def _colour_images(n: int, channels: int = 3, size: int = 12, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Images whose channels move together: one random field per image times a per-image colour, plus noise."""
    rng = np.random.default_rng(seed)
    field = rng.standard_normal((n, 1, size, size))
    colour = np.linspace(1.0, 0.5, channels)[:, None, None] + 0.05 * rng.standard_normal((n, channels, 1, 1))
    return (field * colour + noise * rng.standard_normal((n, channels, size, size))).astype(np.float32)


def _patch_stats(weight: np.ndarray, bias: np.ndarray, images: np.ndarray) -> RegressionStats:
    """The statistics of a stride-1, unpadded conv's patches (channel-major, then tap) and outputs."""
    n, c, h, w = images.shape
    k = weight.shape[-1]
    cols = [images[:, :, i : i + h - k + 1, j : j + w - k + 1] for i in range(k) for j in range(k)]
    patches = np.stack(cols, 2).transpose(0, 3, 4, 1, 2).reshape(-1, c * k * k).astype(np.float64)
    y = patches @ weight.reshape(weight.shape[0], -1).T.astype(np.float64) + bias
    xb = np.concatenate([patches, np.ones((len(patches), 1))], axis=1)
    centred = y - y.mean(0)
    return RegressionStats(
        s=(xb.T @ xb)[None], t=(y.T @ xb)[None], energy=float(np.sum(y**2)), centred_energy=float(np.sum(centred**2)),
        count=len(patches),
    )  # fmt: skip


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_fit_is_exact_when_the_channels_are_one_signal(channels):
    rng = np.random.default_rng(channels)
    weight, bias = rng.standard_normal((6, channels, 3, 3)), rng.standard_normal(6)
    field = rng.standard_normal((8, 1, 10, 10))
    images = field * rng.standard_normal((1, channels, 1, 1)) + rng.standard_normal((1, channels, 1, 1))
    stats = _patch_stats(weight, bias, images)
    fitted = fit_projected(weight, bias, stats, rank=6)  # full rank of the 6×9 single-channel kernel
    assert fitted.squared_error / stats.centred_energy < 1e-8
    assert np.isclose(np.linalg.norm(fitted.factors.projection), 1.0)


def test_fit_beats_the_separable_rank_of_about_the_same_macs_on_correlated_channels():
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
    stats = _patch_stats(weight, bias, _colour_images(32, noise=0.05))
    # 3→8, 3×3: separable rank 1 costs 3·(9 + 8) = 51 MACs per pixel; projected rank 3 costs 3 + 3·17 = 54.
    projected = fit_projected(weight, bias, stats, rank=3).squared_error
    separable = lowrank.fit_separable(weight, 1, bias, stats, 1).squared_error
    assert projected < 0.7 * separable


def test_separable_view_computes_what_the_projected_factors_do():
    rng = np.random.default_rng(1)
    factors = data_free_projected(rng.standard_normal((5, 3, 3, 3)), rank=2)
    x = rng.standard_normal((3, 9))  # one patch per channel
    direct = factors.pointwise @ (factors.depthwise @ (factors.projection @ x))
    dense = lowrank.reconstruct(factors.separable()).reshape(5, 27)
    assert np.allclose(dense @ x.reshape(-1), direct)


def test_only_ungrouped_convs_with_two_to_four_inputs_are_projected():
    assert can_project(3, 1) and can_project(2, 1) and can_project(4, 1)
    assert not can_project(1, 1) and not can_project(5, 1) and not can_project(4, 2) and not can_project(None, 1)


def _stem(seed: int = 0) -> onnx.ModelProto:
    return conv_model(in_channels=3, out_channels=16, spatial=(24, 24), strides=(2, 2), pads=(1, 1, 1, 1), seed=seed)


def test_emitted_chain_computes_the_fitted_function():
    """A saved plan with the projected form and no data: the white-input factors, emitted as mix → filters →
    pointwise, compute exactly the dense conv their separable view describes."""
    import dsrewrite

    model = _stem()
    plan = {"schema": "dsrewrite.plan/1", "layers": [{"output": "y", "status": "rewritten", "rank": 3, "form": "projected"}]}
    result = dsrewrite.rewrite(model, plan=plan, verify=False, benchmark=False)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv", "Conv", "Conv"]
    mix, filters, pointwise = (numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name.endswith("/W"))
    assert mix.shape == (1, 3, 1, 1) and filters.shape == (3, 1, 3, 3) and pointwise.shape == (16, 3, 1, 1)
    (layer,) = [p for p in result.report.layers if p.eligible]
    assert layer.form == "projected" and layer.macs_per_pixel_after == 4 * 3 + 3 * (9 + 16)

    weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W"))
    dense = lowrank.reconstruct(data_free_projected(weight, 3).separable()).astype(np.float32)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.initializer[0].CopyFrom(numpy_helper.from_array(dense, "W"))
    x = _colour_images(1, size=24, noise=1.0, seed=3)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(reference, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_mac_budget_takes_the_projected_stem_when_it_fits_better_and_the_plan_round_trips():
    import dsrewrite

    model = _stem()
    feeds = [{"x": image[None]} for image in _colour_images(16, size=24, noise=0.02)]
    separable = dsrewrite.rewrite(model, target_macs=0.5, calibration=feeds, verify=False, benchmark=False,
                                  latency_aware=False, input_shapes={"x": [1, 3, 24, 24]})  # fmt: skip
    (layer,) = [p for p in separable.report.layers if p.eligible]
    assert layer.form == "projected" and layer.fit.startswith("input projection")
    assert separable.report.totals.eligible_macs_ratio <= 0.5
    assert any("input-projected rank" in note for note in separable.report.notes)
    ratio = separable.report.totals.eligible_macs_ratio
    assert f"after the input-projected offer: eligible MACs {ratio:.3f}" in " ".join(separable.report.notes)
    # Within the budget, no separable rank comes near its error.
    affordable = [e for r, e in enumerate(layer.layer_error_at_rank, start=1) if 3 * r * (9 + 16) <= 0.5 * 432]
    assert layer.output_error < 0.5 * min(affordable)

    again = dsrewrite.rewrite(model, plan=separable.plan_document(), calibration=feeds, verify=False, benchmark=False)
    (replayed,) = [p for p in again.report.layers if p.eligible]
    assert (replayed.rank, replayed.form) == (layer.rank, "projected")
    x = feeds[0]["x"]
    np.testing.assert_allclose(run(again.model, {"x": x})[0], run(separable.model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_never_slower_falls_back_to_the_separable_rank_a_slow_projection_replaced(tmp_path):
    from dsrewrite.decide import NeverSlower, SavedPlan
    from dsrewrite.measure import RankTimings
    from dsrewrite.plan import FORM_PROJECTED, Decision, Decisions

    import test_decide

    path = tmp_path / "stem.onnx"
    onnx.save(_stem(), path)
    plans = test_decide._plans(path)
    (plan,) = [p for p in plans if p.eligible]
    timed = []

    class Timer:
        def at_ranks(self, plans, ranks, forms=None):
            timed.append(forms)
            form = (forms or {}).get(plan.output, ["concat"])[0]
            return {p.output: RankTimings(1.0, {ranks[p.output]: (form, 2.0 if form == FORM_PROJECTED else 0.5)}) for p in plans}

    class Measured:
        timer = Timer()
        where = "onnxruntime"

        def describe(self, timings):
            return f"{len(timings)} conv(s) timed"

    separable = Decision(1)
    projected = Decisions({plan.output: Decision(3, form=FORM_PROJECTED, replaces=separable)})
    decisions = NeverSlower(SavedPlan(projected)).decide(plans, Measured())
    final = decisions.layers[plan.output]
    assert (final.rank, final.form, final.latency_ms) == (1, "concat", (1.0, 0.5))
    assert timed[0] == {plan.output: [FORM_PROJECTED]} and timed[1] in (None, {})
    assert any("measured no faster" in note for note in decisions.notes)
