"""Fitting to calibration data: the math in lowrank, and distillation end to end."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLES, run

import dsrewrite
from dsrewrite import lowrank
from dsrewrite.calibration import RegressionAccumulator


def correlated_stats(weight, groups, bias, samples=4000, seed=0):
    """Statistics of y = W x + b on smooth (strongly correlated) input patches."""
    rng = np.random.default_rng(seed)
    n, mg = weight.shape[:2]
    k = int(np.prod(weight.shape[2:]))
    m = mg * groups
    mixing = rng.standard_normal((k, k)) * np.linspace(1.0, 0.05, k)
    patches = np.einsum("kl,mlp->mkp", mixing, rng.standard_normal((m, k, samples))) + 0.3
    dense = weight.reshape(groups, n // groups, mg * k)
    y = (dense @ patches.reshape(groups, mg * k, samples)).reshape(n, samples) + bias[:, None]
    acc = RegressionAccumulator(m, n, k, groups)
    acc.add(patches, y)
    return acc.finish()


@pytest.mark.parametrize("groups", [1, 2])
def test_full_rank_fit_is_exact(groups):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 4 // groups, 3, 3))
    bias = rng.standard_normal(6)
    stats = correlated_stats(weight, groups, bias)
    fit = lowrank.fit_separable(weight, groups, bias, stats, rank=9)
    # Exact up to the tiny ridge that keeps the solves well-posed.
    assert fit.squared_error / stats.centred_energy < 1e-6
    assert fit.data_free_error / stats.centred_energy < 1e-12
    np.testing.assert_allclose(fit.bias, bias, atol=1e-3)


@pytest.mark.parametrize("groups", [1, 2])
def test_kernel_prior_adds_white_pseudo_samples_in_place_and_restores_the_statistics(groups):
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((6, 4 // groups, 3, 3))
    stats = correlated_stats(weight, groups, rng.standard_normal(6))
    s_before, t_before = stats.s.copy(), stats.t.copy()
    features = stats.s.shape[1] - 1
    with stats.kernel_prior(weight, strength=0.5) as prior:
        assert prior.s is stats.s  # no copy of the large matrix
        for gi in range(groups):
            mu = 0.5 * np.trace(s_before[gi, :-1, :-1]) / features  # per pseudo-sample direction
            expected = s_before[gi].copy()
            expected[:-1, :-1] += mu * np.eye(features)
            np.testing.assert_allclose(prior.s[gi], expected, rtol=1e-14)
            w = weight.reshape(groups, -1, features)[gi]
            np.testing.assert_allclose(prior.t[gi, :, :-1], t_before[gi, :, :-1] + mu * w, rtol=1e-14)
    assert np.array_equal(stats.s, s_before) and np.array_equal(stats.t, t_before)
    with pytest.raises(RuntimeError), stats.kernel_prior(weight):
        raise RuntimeError
    assert np.array_equal(stats.s, s_before)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_fitting_beats_the_data_free_factors_and_more_rounds_never_hurt(rank):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((8, 4, 3, 3))
    bias = rng.standard_normal(8)
    stats = correlated_stats(weight, 1, bias)
    errors = [lowrank.fit_separable(weight, 1, bias, stats, rank, rounds=rounds).squared_error for rounds in (0, 1, 3)]
    data_free = lowrank.fit_separable(weight, 1, bias, stats, rank).data_free_error
    assert errors[0] < data_free
    assert errors[0] >= errors[1] * (1 - 1e-6) >= errors[2] * (1 - 1e-6)


def test_whitening_beats_plain_svd_on_correlated_inputs():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((8, 4, 3, 3))
    bias = np.zeros(8)
    stats = correlated_stats(weight, 1, bias)
    plain = lowrank.fit_separable(weight, 1, bias, stats, 1, rounds=0, whiten=False).squared_error
    whitened = lowrank.fit_separable(weight, 1, bias, stats, 1, rounds=0, whiten=True).squared_error
    assert whitened < plain


def smooth_images(n, seed, shape=(3, 64, 64)):
    """Low-pass random images: correlated neighbouring pixels, like real photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((n, shape[0], shape[1] // 8, shape[2] // 8))
    images = coarse.repeat(8, axis=2).repeat(8, axis=3)
    return (images + 0.1 * rng.standard_normal((n, *shape))).astype(np.float32)


@pytest.mark.parametrize("sequential", [True, False])
def test_distillation_brings_the_model_closer_to_the_original(sequential):
    path = SAMPLES / "vgg_small.onnx"
    calibration = [{"input": x[None]} for x in smooth_images(12, seed=0)]
    held_out = smooth_images(4, seed=1)
    data_free = dsrewrite.rewrite(path, rank=1, verify=False)
    fitted = dsrewrite.rewrite(path, rank=1, calibration=calibration, sequential=sequential)
    for layer in fitted.report.layers:
        assert layer.rewritten and "refit" in layer.fit
        assert layer.output_error < layer.output_error_data_free
        assert layer.fit_seconds is not None
    original = dsrewrite.load_model(path)

    def error(model):
        return np.mean([
            np.sum((run(model, {"input": x[None]})[0] - run(original, {"input": x[None]})[0]) ** 2)
            for x in held_out
        ])  # fmt: skip

    assert error(fitted.model) < 0.5 * error(data_free.model)
    assert fitted.verification.inputs.startswith("calibration")


def test_calibration_through_the_cli(tmp_path):
    from conftest import dsrewrite_cli

    np.savez(tmp_path / "calib.npz", input=smooth_images(6, seed=3))
    code, out, err = dsrewrite_cli(
        SAMPLES / "vgg_small.onnx", "-o", tmp_path / "slim.onnx", "--rank", "2",
        "--calibration", tmp_path / "calib.npz", "--calibration-samples", "4", "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["samples"] == 4
    assert all(layer["output_error"] is not None for layer in report["layers"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=smooth_images(2, seed=4))
    code, _, err = dsrewrite_cli(SAMPLES / "vgg_small.onnx", "-o", tmp_path / "s2.onnx", "--calibration", bad)
    assert code == 2 and err.startswith("error:") and "unknown input" in err
    assert not (tmp_path / "s2.onnx").exists()


def test_sampled_positions_per_conv_stay_bounded_as_feeds_grow(monkeypatch):
    """Beyond ``REFERENCE_FEEDS`` feeds the positions accumulated per conv (and so the fit's time and spilled
    targets) stay at the reference count's worth: more feeds mean fewer positions from each."""
    from dsrewrite.calibration import REFERENCE_FEEDS, positions_per_feed
    from dsrewrite.distill import DistillOptions

    seen: list[tuple[int, int, int]] = []
    finish = RegressionAccumulator.finish

    def recording_finish(self):
        seen.append((self.features, self.groups, self.count))
        return finish(self)

    monkeypatch.setattr(RegressionAccumulator, "finish", recording_finish)
    counts = {}
    for feeds in (REFERENCE_FEEDS, 4 * REFERENCE_FEEDS):
        seen.clear()
        calibration = [{"input": x[None]} for x in smooth_images(feeds, seed=5)]
        dsrewrite.rewrite(SAMPLES / "vgg_small.onnx", rank=1, calibration=calibration, verify=False, benchmark=False,
                          include=("conv1", "conv3"), distill=DistillOptions(activation_aware=False))  # fmt: skip
        counts[feeds] = list(seen)
    small, large = counts[REFERENCE_FEEDS], counts[4 * REFERENCE_FEEDS]
    assert len(small) == len(large) == 2
    for (features, groups, few), (_, _, many) in zip(small, large):
        cap = REFERENCE_FEEDS * positions_per_feed(features, groups)
        assert many <= cap + 4 * REFERENCE_FEEDS  # per-feed rounding
        assert many <= 4 * few
    # The first conv (64×64 output, 4096 positions per feed) is sampled in full at 64 feeds and thinned at 256.
    assert small[0][2] == large[0][2] == REFERENCE_FEEDS * 64 * 64
