"""lowrank: per-channel SVD factorisation, pure numpy."""

from __future__ import annotations

import numpy as np
import pytest

from dsrewrite import lowrank


@pytest.mark.parametrize("shape,groups", [((6, 4, 3, 3), 1), ((6, 2, 3, 3), 2), ((5, 3, 3), 1), ((4, 2, 2, 2, 2), 2), ((12, 1, 3, 3), 1)])
def test_full_rank_reconstructs_the_kernel(shape, groups):
    w = np.random.default_rng(0).standard_normal(shape)
    spectra = lowrank.channel_spectra(w, groups)
    factors = lowrank.factorize(spectra, spectra.full_rank)
    np.testing.assert_allclose(lowrank.reconstruct(factors), w, atol=1e-12)
    assert spectra.relative_error(spectra.full_rank) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_error_curve_equals_the_reconstruction_error(rank):
    w = np.random.default_rng(1).standard_normal((8, 4, 3, 3))
    spectra = lowrank.channel_spectra(w)
    approx = lowrank.reconstruct(lowrank.factorize(spectra, rank))
    measured = np.linalg.norm(w - approx) / np.linalg.norm(w)
    assert spectra.relative_error(rank) == pytest.approx(measured, rel=1e-9)


def test_truncated_svd_is_the_best_rank_r_fit_per_channel():
    w = np.random.default_rng(2).standard_normal((5, 1, 3, 3))
    spectra = lowrank.channel_spectra(w)
    a = w[:, 0].reshape(5, 9)
    s = np.linalg.svd(a, compute_uv=False)
    assert spectra.relative_error(1) == pytest.approx(np.sqrt((s[1:] ** 2).sum() / (s**2).sum()))


def test_factor_shapes_and_rank_clipping():
    w = np.random.default_rng(3).standard_normal((6, 4, 3, 3))
    spectra = lowrank.channel_spectra(w)
    assert spectra.full_rank == 6
    factors = lowrank.factorize(spectra, 100)
    assert factors.rank == 6
    assert factors.depthwise.shape == (4, 6, 9)
    assert factors.pointwise.shape == (6, 4, 6)


def test_errors_decrease_with_rank_and_zero_weights_are_harmless():
    w = np.random.default_rng(4).standard_normal((8, 3, 3, 3))
    errors = lowrank.relative_errors(lowrank.channel_spectra(w))
    assert errors[0] == pytest.approx(1.0) and np.all(np.diff(errors) <= 1e-12)
    zero = lowrank.channel_spectra(np.zeros((4, 2, 3, 3)))
    assert lowrank.relative_errors(zero).max() == 0.0
    np.testing.assert_array_equal(lowrank.reconstruct(lowrank.factorize(zero, 1)), 0.0)


@pytest.mark.parametrize("band_bytes", [1, 2000, 16 * 2**20])
def test_the_pointwise_solve_is_the_normal_equations_whatever_the_band(monkeypatch, band_bytes):
    """The pointwise solve builds D̄ s D̄ᵀ a band of channels at a time (memory); any banding gives the
    solution of the whole normal equations."""
    from dsrewrite.calibration import RegressionAccumulator

    rng = np.random.default_rng(3)
    m, n, k, r = 7, 5, 4, 2
    accumulator = RegressionAccumulator(m, n, k, 1)
    accumulator.add(rng.standard_normal((m, k, 400)), rng.standard_normal((n, 400)))
    stats = accumulator.finish()
    s, t = stats.s[0], stats.t[0]
    d = rng.standard_normal((m, r, k))
    monkeypatch.setattr(lowrank, "_BAND_BYTES", band_bytes)
    p, b = lowrank._solve_pointwise(d, s, t, 1e-3)

    depthwise = np.zeros((m * r + 1, m * k + 1))  # D̄: block-diagonal filters, and the constant 1
    for c in range(m):
        depthwise[c * r : (c + 1) * r, c * k : (c + 1) * k] = d[c]
    depthwise[-1, -1] = 1.0
    gram, cross = depthwise @ s @ depthwise.T, t @ depthwise.T
    penalty = np.full(m * r + 1, lowrank.relative_ridge(np.diag(gram)[:-1], 1e-3))
    penalty[-1] = 0.0
    expected = np.linalg.solve(gram + np.diag(penalty), cross.T).T
    np.testing.assert_allclose(p, expected[:, :-1].reshape(n, m, r), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b, expected[:, -1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block", [1, 3, 7, 256])
def test_blocked_cholesky_solves_in_place_like_lapack(block):
    rng = np.random.default_rng(block)
    m = rng.standard_normal((40, 45))
    a = m @ m.T + 1e-3 * np.eye(40)
    b = rng.standard_normal((40, 3))
    work = a.copy()
    np.testing.assert_allclose(lowrank._cholesky_solve_in_place(work, b, block=block), np.linalg.solve(a, b), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.tril(work) @ np.tril(work).T, a, rtol=1e-10, atol=1e-10)  # a holds its factor
    with pytest.raises(np.linalg.LinAlgError):  # not positive definite: the caller falls back to a general solve
        lowrank._cholesky_solve_in_place(-a.copy(), b, block=block)
