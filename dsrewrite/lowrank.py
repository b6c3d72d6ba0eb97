"""Per-input-channel low-rank factorisation of convolution kernels (numpy only).

A conv weight ``W`` has shape ``(N, M/g, k1..kd)``. Flatten the kernel to
``K = k1·…·kd``. Within group ``gi`` (``N/g`` outputs, ``M/g`` inputs), input
channel ``c`` contributes ``A = W[gi·N/g:(gi+1)·N/g, c]`` (an ``N/g × K``
matrix) to the output. Its SVD ``A = U S Vᵀ`` truncated to rank ``r`` gives

* ``r`` depthwise filters ``D[m, j] = √s_j · v_j`` (length ``K``) and
* ``r`` pointwise columns ``P[:, c, j] = √s_j · u_j`` (length ``N/g``),

so that ``y = Σ_c Σ_j P[:, c, j] · (D[m, j] ⋆ x_m)``. At ``r = min(N/g, K)``
this is exact. No ONNX here: graph editing lives in ``passes/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits


@dataclass(frozen=True)
class ChannelSpectra:
    """Batched per-input-channel SVD of one kernel, in float64.

    Shapes (``g`` groups, ``Mg = M/g`` inputs and ``Ng = N/g`` outputs per
    group, ``q = min(Ng, K)``): ``u (g, Mg, Ng, q)``, ``s (g, Mg, q)``,
    ``vt (g, Mg, q, K)``.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    kernel_shape: tuple[int, ...]

    @property
    def groups(self) -> int:
        return self.s.shape[0]

    @property
    def full_rank(self) -> int:
        return self.s.shape[2]

    def relative_error(self, rank: int) -> float:
        """‖W − Ŵ_r‖_F / ‖W‖_F, read off the discarded singular values."""
        return float(relative_errors(self)[min(rank, self.full_rank)])


@dataclass(frozen=True)
class SeparableFactors:
    """Depthwise and pointwise weights of a rank-``r`` factorisation.

    ``depthwise``: ``(M, r, K)``, the ``r`` filters of every input channel.
    ``pointwise``: ``(N, M/g, r)``, output ``n`` of group ``n // (N/g)`` reads
    local input channel ``c`` through component ``j`` with weight ``[n, c, j]``.
    """

    depthwise: np.ndarray
    pointwise: np.ndarray
    groups: int
    kernel_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.depthwise.shape[1]


def channel_spectra(weight: np.ndarray, groups: int = 1) -> ChannelSpectra:
    """Per-input-channel SVD of a conv weight ``(N, M/g, *kernel)``."""
    weight = np.asarray(weight, dtype=np.float64)
    n_out, m_per_group = weight.shape[:2]
    kernel_shape = tuple(int(k) for k in weight.shape[2:])
    k = int(np.prod(kernel_shape, dtype=np.int64)) if kernel_shape else 1
    if n_out % groups:
        raise ValueError(f"output channels {n_out} not divisible by group {groups}")
    n_per_group = n_out // groups
    # (g, Ng, Mg, K) -> (g, Mg, Ng, K): one Ng×K matrix per input channel.
    per_channel = weight.reshape(groups, n_per_group, m_per_group, k).transpose(0, 2, 1, 3)
    u, s, vt = np.linalg.svd(per_channel, full_matrices=False)
    return ChannelSpectra(u=u, s=s, vt=vt, kernel_shape=kernel_shape)


def relative_errors(spectra: ChannelSpectra) -> np.ndarray:
    """Relative Frobenius error of the whole kernel at every rank 0..q."""
    energy = spectra.s**2  # (g, Mg, q)
    total = float(energy.sum())
    if total == 0.0:
        return np.zeros(spectra.full_rank + 1)
    # Every channel keeps its top r values (s is sorted per channel), so the
    # energy kept at rank r is a cumulative sum over the q axis.
    kept = np.concatenate([[0.0], np.cumsum(energy.sum(axis=(0, 1)))])
    discarded = np.clip(total - kept, 0.0, None)
    return np.sqrt(discarded / total)


def factorize(spectra: ChannelSpectra, rank: int) -> SeparableFactors:
    """Truncate the per-channel SVDs to ``rank`` and split √s between the factors."""
    r = max(1, min(int(rank), spectra.full_rank))
    g, mg, _ng, _q = spectra.u.shape
    root = np.sqrt(spectra.s[:, :, :r])  # (g, Mg, r)
    depthwise = root[..., None] * spectra.vt[:, :, :r, :]  # (g, Mg, r, K)
    pointwise = spectra.u[:, :, :, :r] * root[:, :, None, :]  # (g, Mg, Ng, r)
    depthwise = depthwise.reshape(g * mg, r, -1)
    pointwise = pointwise.transpose(0, 2, 1, 3).reshape(-1, mg, r)  # (N, Mg, r)
    return SeparableFactors(depthwise=depthwise, pointwise=pointwise, groups=g, kernel_shape=spectra.kernel_shape)


def reconstruct(factors: SeparableFactors) -> np.ndarray:
    """The dense kernel ``(N, M/g, *kernel)`` that the factors compute."""
    g = factors.groups
    m, r, k = factors.depthwise.shape
    n, mg, _ = factors.pointwise.shape
    ng = n // g
    dw = factors.depthwise.reshape(g, mg, r, k)
    pw = factors.pointwise.reshape(g, ng, mg, r)
    dense = np.einsum("gncr,gcrk->gnck", pw, dw).reshape(n, mg, *factors.kernel_shape)
    return dense


# -- fitting to calibration statistics --------------------------------------------------------


def whitened_spectra(weight: np.ndarray, groups: int, covariances: np.ndarray) -> tuple[ChannelSpectra, np.ndarray]:
    """Per-channel SVD of ``A_m L_m``, with ``L_m`` the Cholesky factor of channel ``m``'s patch covariance.

    Minimising ``‖(A_m − Â_m) L_m‖`` is minimising the channel's contribution
    to the output error on inputs with second moment ``C_m = L_m L_mᵀ``. The
    truncated ``Â_m = U_r S_r V_rᵀ L_m⁻¹``, so the returned spectra carry
    ``vt`` already mapped back through ``L_m⁻¹`` (their rows are no longer
    orthonormal). Also returns the Cholesky factors ``(M, K, K)``.

    A small ridge keeps rank-deficient covariances (dead channels, constant
    padding) invertible; an all-zero covariance falls back to the identity,
    i.e. the plain SVD.
    """
    weight = np.asarray(weight, dtype=np.float64)
    n_out, m_per_group = weight.shape[:2]
    kernel_shape = tuple(int(k) for k in weight.shape[2:])
    k = int(np.prod(kernel_shape, dtype=np.int64))
    per_channel = weight.reshape(groups, n_out // groups, m_per_group, k).transpose(0, 2, 1, 3)
    cholesky = regularised_cholesky(covariances).reshape(groups, m_per_group, k, k)
    u, s, vt = np.linalg.svd(per_channel @ cholesky, full_matrices=False)
    # Rows of Vᵀ L⁻¹: solve L_mᵀ x = v_j for each j.
    mapped = np.linalg.solve(np.swapaxes(cholesky, -1, -2), np.swapaxes(vt, -1, -2))
    return ChannelSpectra(u=u, s=s, vt=np.swapaxes(mapped, -1, -2), kernel_shape=kernel_shape), cholesky.reshape(-1, k, k)


def regularised_cholesky(covariances: np.ndarray, ridge: float = 1e-4) -> np.ndarray:
    """Cholesky factors of ``C + ridge·mean(diag C)·I`` per channel (identity where ``C = 0``)."""
    c = np.asarray(covariances, dtype=np.float64)
    k = c.shape[-1]
    scale = np.trace(c, axis1=-2, axis2=-1) / k
    scale = np.where(scale > 0, scale, 1.0)
    eye = np.eye(k)
    zero = (np.abs(c).sum(axis=(-2, -1)) == 0)[..., None, None]
    regularised = np.where(zero, eye, c + ridge * scale[..., None, None] * eye)
    return np.linalg.cholesky(regularised)


@dataclass(frozen=True)
class RegressionStats:
    """Second moments of one conv's inputs and outputs, per group, summed over calibration positions.

    With ``x̄ = [x; 1]`` the ``F = (M/g)·K`` patch values of a group (channel-major,
    then kernel tap) plus a constant for the bias, and ``y`` the group's ``N/g``
    original outputs: ``s (g, F+1, F+1) = Σ x̄ x̄ᵀ``, ``t (g, N/g, F+1) = Σ y x̄ᵀ``,
    ``energy = Σ ‖y‖²``. ``centred_energy = Σ ‖y − ȳ‖²`` normalises the reported error.
    """

    s: np.ndarray
    t: np.ndarray
    energy: float
    centred_energy: float
    count: int = 0  # positions summed

    @contextmanager
    def kernel_prior(self, weight: np.ndarray, strength: float | None = None) -> Iterator["RegressionStats"]:
        """The statistics plus pseudo-samples of white inputs labelled by the original kernel, while in context.

        Adding ``μ·I`` to ``Σ x xᵀ`` and ``μ·W`` to ``Σ y xᵀ`` is exactly what
        white-noise inputs through the original (linear) conv would add, so
        every fitting step is pulled towards reproducing the original kernel,
        the data-free answer, instead of towards zero. ``strength`` is the number
        of pseudo-samples per real one; by default ``F / count`` (capped to
        [1e-3, 1]), i.e. about ``F`` pseudo-samples: negligible with plenty of
        data, decisive when positions are fewer than features (small feature
        maps, wide layers), where plain least squares would fit noise.

        ``s`` is not copied: a 512-channel 3×3 conv's is 170 MB. Its diagonal is raised in place and its
        ``F`` saved values are put back on exit, so the statistics are bit for bit what they were.
        Not for concurrent fits of the same statistics.
        """
        g, f1, _ = self.s.shape
        features = f1 - 1
        if strength is None:
            strength = min(1.0, max(1e-3, features / max(self.count, 1)))
        w = np.asarray(weight, dtype=np.float64).reshape(g, -1, features)
        diagonal = np.arange(features)
        saved = self.s[:, diagonal, diagonal].copy()  # (g, F)
        raised = strength * saved.sum(axis=1) / features  # μ/F per group: μ = strength · trace
        t = self.t.copy()
        t[:, :, :-1] += raised[:, None, None] * w
        energy = self.energy + float(np.sum(raised * np.sum(w**2, axis=(1, 2))))
        try:
            self.s[:, diagonal, diagonal] += raised[:, None]  # not `+= μ·eye`: two F×F temporaries
            yield RegressionStats(s=self.s, t=t, energy=energy, centred_energy=self.centred_energy, count=self.count)
        finally:
            self.s[:, diagonal, diagonal] = saved


def regression_error(weights: np.ndarray, stats: RegressionStats) -> float:
    """``Σ ‖y − W̄ x̄‖²`` in closed form for per-group dense weights ``W̄ (g, N/g, F+1)``."""
    error = stats.energy
    for w, s, t in zip(weights, stats.s, stats.t):
        error += float(-2.0 * np.sum(w * t) + np.sum((w @ s) * w))
    return max(error, 0.0)


@dataclass(frozen=True)
class FittedFactors:
    """Factors fitted to data, the refitted bias, and their squared output errors (fitted and data-free)."""

    factors: SeparableFactors
    bias: np.ndarray
    squared_error: float
    data_free_error: float


def fit_separable(
    weight: np.ndarray,
    groups: int,
    bias: np.ndarray | None,
    stats: RegressionStats,
    rank: int,
    *,
    rounds: int = 2,
    ridge: float = 1e-5,
    whiten: bool = True,
    refit: bool = True,
) -> FittedFactors:
    """Fit rank-``rank`` separable factors to a conv's calibration statistics.

    1. Whitened SVD per input channel (``C_m``: the channel's diagonal block of ``s``).
    All steps see the statistics plus a prior towards the original kernel
    (:meth:`RegressionStats.kernel_prior`); errors are reported on the data alone.

    2. ``rounds`` of alternating least squares: pointwise weights and bias in
       closed form, then each channel's depthwise filters in turn (block
       coordinate descent: exact for that block given everything else).
    3. A final pointwise/bias solve.
    With ``refit=False`` only step 1 runs and the original bias is kept.
    Every step can only lower ``Σ ‖y − ŷ‖²`` (up to the small ridge), which is
    evaluated in closed form from the same sums.
    """
    weight = np.asarray(weight, dtype=np.float64)
    n, mg = weight.shape[:2]
    kernel_shape = tuple(int(k) for k in weight.shape[2:])
    k = int(np.prod(kernel_shape, dtype=np.int64))
    ng = n // groups
    r = max(1, min(int(rank), ng, k))
    original_bias = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64)
    per_group = weight.reshape(groups, ng, mg, k)

    with stats.kernel_prior(weight) as prior:
        depthwise, pointwise, biases = [], [], []
        for gi in range(groups):
            s, t = prior.s[gi], prior.t[gi]
            if whiten:
                covariances = _diagonal_blocks(s, mg, k)
                spectra, _ = whitened_spectra(per_group[gi].reshape(ng, mg, *kernel_shape), 1, covariances)
            else:
                spectra = channel_spectra(per_group[gi].reshape(ng, mg, *kernel_shape), 1)
            init = factorize(spectra, r)
            d = init.depthwise  # (Mg, r, K)
            if not refit:
                depthwise.append(d)
                pointwise.append(init.pointwise)
                biases.append(original_bias[gi * ng : (gi + 1) * ng])
                continue
            d, p, b = _alternate(d, s, t, rounds, ridge)
            depthwise.append(d)
            pointwise.append(p)
            biases.append(b)

    factors = SeparableFactors(
        depthwise=np.concatenate(depthwise),
        pointwise=np.concatenate(pointwise),
        groups=groups,
        kernel_shape=kernel_shape,
    )
    fitted_bias = np.concatenate(biases)
    dense = reconstruct(factors).reshape(groups, ng, mg * k)
    fitted_weights = np.concatenate([dense, fitted_bias.reshape(groups, ng, 1)], axis=2)
    squared_error = regression_error(fitted_weights, stats)
    data_free = factorize(channel_spectra(weight, groups), r)  # here, not before the fit: its arrays are not held there
    dense_free = reconstruct(data_free).reshape(groups, ng, mg * k)
    free_weights = np.concatenate([dense_free, original_bias.reshape(groups, ng, 1)], axis=2)
    data_free_error = regression_error(free_weights, stats)
    if data_free_error < squared_error:
        # The ridge can cost more than the fit gains: at full rank the SVD is exact and stays so.
        return FittedFactors(factors=data_free, bias=original_bias, squared_error=data_free_error, data_free_error=data_free_error)
    return FittedFactors(factors=factors, bias=fitted_bias, squared_error=squared_error, data_free_error=data_free_error)


def refine_separable(
    factors: SeparableFactors, stats: RegressionStats, *, rounds: int = 1, ridge: float = 1e-5
) -> tuple[SeparableFactors, np.ndarray]:
    """Alternating least squares from given factors: per group a pointwise/bias solve, then ``rounds``
    (depthwise sweep, pointwise/bias solve) pairs. Returns the factors and the bias.

    ``fit_separable`` starts from a whitened SVD; this starts wherever the caller is, e.g. the
    activation-aware fit (``activation_fit``), which re-solves against a moved target each iteration.
    ``stats`` are used as given (add a kernel prior before calling if wanted).
    """
    g = factors.groups
    m, r, k = factors.depthwise.shape
    mg = m // g
    depthwise, pointwise, biases = [], [], []
    for gi in range(g):
        s, t = stats.s[gi], stats.t[gi]
        d = factors.depthwise[gi * mg : (gi + 1) * mg]
        d, p, b = _alternate(d, s, t, rounds, ridge)
        depthwise.append(d)
        pointwise.append(p)
        biases.append(b)
    refined = SeparableFactors(
        depthwise=np.concatenate(depthwise), pointwise=np.concatenate(pointwise), groups=g, kernel_shape=factors.kernel_shape
    )
    return refined, np.concatenate(biases)


def _alternate(d: np.ndarray, s: np.ndarray, t: np.ndarray, rounds: int, ridge: float):
    """One group's ALS from depthwise filters ``d``: a pointwise/bias solve, then ``rounds`` (depthwise sweep,
    pointwise/bias solve) pairs. Returns (depthwise, pointwise, bias)."""
    p, b = _solve_pointwise(d, s, t, ridge)
    for _ in range(rounds):
        with threadpool_limits(limits=1, user_api="blas"):
            d = _solve_depthwise(d, p, b, s, t, ridge)
        p, b = _solve_pointwise(d, s, t, ridge)
    return d, p, b


def dense_weights(factors: SeparableFactors, bias: np.ndarray) -> np.ndarray:
    """Per-group dense weights ``W̄ (g, N/g, F+1)`` (kernel, then bias) that the factors compute."""
    g = factors.groups
    dense = reconstruct(factors)
    n = dense.shape[0]
    return np.concatenate([dense.reshape(g, n // g, -1), np.asarray(bias, dtype=np.float64).reshape(g, n // g, 1)], axis=2)


def _diagonal_blocks(s: np.ndarray, channels: int, taps: int) -> np.ndarray:
    """Each channel's ``K×K`` second-moment block of ``s``."""
    xx = s[:-1, :-1].reshape(channels, taps, channels, taps)
    return xx[np.arange(channels), :, np.arange(channels), :]


def relative_ridge(matrix_diag: np.ndarray, ridge: float) -> float:
    """``ridge`` times the mean of a normal matrix's diagonal (``ridge`` itself where that is not positive)."""
    mean = float(np.mean(matrix_diag)) if matrix_diag.size else 0.0
    return ridge * mean if mean > 0 else ridge


_BAND_BYTES = 16 * 2**20  # the working set of one band in _solve_pointwise


def _solve_pointwise(d: np.ndarray, s: np.ndarray, t: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise weights ``(Ng, Mg, r)`` and bias minimising the error for fixed depthwise ``d (Mg, r, K)``.

    The depthwise outputs ``z̄ = [D x; 1]`` have moments ``D̄ s D̄ᵀ`` and ``t D̄ᵀ``
    (``D̄`` block diagonal), so no data is needed here.
    """
    mg, r, _k = d.shape
    ng = t.shape[0]
    gram, cross = _pointwise_normal_equations(d, s, t, ridge)
    try:
        # In place: LAPACK's solve copies the Gram matrix (134 MB at rank 8 of a 512-channel conv) and pivots.
        solution = _cholesky_solve_in_place(gram, cross.T).T
    except np.linalg.LinAlgError:  # not numerically positive definite: the factorisation overwrote it
        gram, cross = _pointwise_normal_equations(d, s, t, ridge)
        solution = _solve_symmetric(gram, cross.T).T
    return solution[:, :-1].reshape(ng, mg, r), solution[:, -1]


def _pointwise_normal_equations(d: np.ndarray, s: np.ndarray, t: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The Gram matrix ``D̄ s D̄ᵀ`` (ridge on all but the bias) and the cross moments ``(Ng, Mg·r+1)`` of the pointwise solve."""
    mg, r, k = d.shape
    ng = t.shape[0]
    x1 = s[:-1, -1].reshape(mg, k)
    # D̄ s D̄ᵀ a band of channels at a time, straight into the Gram matrix: contracted whole, einsum copied s
    # (170 MB at F = 4608) and held a (Mg, r, Mg, K) intermediate, and a separate D̄ s D̄ᵀ is as large as the Gram
    # matrix itself (134 MB at rank 8 of a 512-channel conv).
    gram = np.empty((mg * r + 1, mg * r + 1))
    zz = gram[:-1, :-1]
    blocks = zz.reshape(mg, r, mg, r)  # a view: splitting axes keeps the strides
    band = max(1, _BAND_BYTES // (8 * k * mg * max(k, r)))
    for a in range(0, mg, band):
        rows = s[a * k : min(a + band, mg) * k, :-1].reshape(-1, k, mg, k)  # not the bias row after them
        left = np.einsum("ajk,akbl->ajbl", d[a : a + band], rows, optimize=True)
        blocks[a : a + band] = np.einsum("ajbl,bil->ajbi", left, d, optimize=True)
    z1 = np.einsum("ajk,ak->aj", d, x1).reshape(mg * r)
    yz = np.einsum("nak,ajk->naj", t[:, :-1].reshape(ng, mg, k), d, optimize=True).reshape(ng, mg * r)
    gram[:-1, -1], gram[-1, :-1], gram[-1, -1] = z1, z1, s[-1, -1]
    cross = np.concatenate([yz, t[:, -1:]], axis=1)
    penalty = np.full(mg * r + 1, relative_ridge(np.diag(zz), ridge))
    penalty[-1] = 0.0  # the bias is not shrunk
    gram[np.diag_indices_from(gram)] += penalty  # in place: `gram + np.diag(penalty)` made two more copies
    return gram, cross


_CHOLESKY_BLOCK = 256


def _cholesky_solve_in_place(a: np.ndarray, b: np.ndarray, block: int = _CHOLESKY_BLOCK) -> np.ndarray:
    """Solve ``a x = b`` for symmetric positive definite ``a (n, n)``, overwriting ``a`` with its Cholesky factor.

    Blocked, right-looking: each diagonal block is factorised by LAPACK, the panel below it solved against
    that block's inverse, and the trailing matrix updated a band of rows at a time, so no temporary exceeds
    ``_BAND_BYTES`` or one panel. Only the lower triangle of ``a`` is read. Raises ``LinAlgError`` when ``a`` is
    not numerically positive definite (``a`` is then partly overwritten).
    """
    n = a.shape[0]
    band = max(block, _BAND_BYTES // (8 * max(n, 1)))
    inverses = []  # each diagonal block's L⁻¹, for the two triangular solves
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        factor = np.linalg.cholesky(a[j0:j1, j0:j1])
        inverse = np.linalg.inv(factor)
        a[j0:j1, j0:j1] = factor
        inverses.append(inverse)
        if j1 == n:
            break
        panel = a[j1:, j0:j1]
        panel[...] = panel @ inverse.T  # L21 = A21 L11⁻ᵀ
        for r0 in range(j1, n, band):  # A22 −= L21 L21ᵀ, on and below the diagonal
            r1 = min(r0 + band, n)
            a[r0:r1, j1:r1] -= panel[r0 - j1 : r1 - j1] @ panel[: r1 - j1].T
    x = np.array(b, dtype=np.float64, copy=True)
    for index, j0 in enumerate(range(0, n, block)):  # L y = b
        j1 = min(j0 + block, n)
        x[j0:j1] = inverses[index] @ (x[j0:j1] - a[j0:j1, :j0] @ x[:j0])
    for index in reversed(range(len(inverses))):  # Lᵀ x = y
        j0 = index * block
        j1 = min(j0 + block, n)
        x[j0:j1] = inverses[index].T @ (x[j0:j1] - a[j1:, j0:j1].T @ x[j1:])
    return x


def _solve_depthwise(
    d: np.ndarray, p: np.ndarray, b: np.ndarray, s: np.ndarray, t: np.ndarray, ridge: float
) -> np.ndarray:
    """One sweep of exact per-channel updates of the depthwise filters, pointwise fixed.

    With ``W̄ = [P_1 D_1 … P_M D_M, b]`` and ``Q = P_m``, channel ``m``'s filters
    solve ``QᵀQ D_m S_mm = Qᵀ (T_m − W̄_{−m} S_{·m})``, in turn (Gauss-Seidel), so
    each update sees the ones before it. Everything that does not change within
    the sweep (the regularised inverses of ``QᵀQ`` and ``S_mm``, the column blocks
    of ``S``) is computed once, batched over channels.
    """
    mg, r, k = d.shape
    n = p.shape[0]
    d = d.copy()
    dense = np.concatenate([np.einsum("naj,ajk->nak", p, d).reshape(n, mg * k), b[:, None]], axis=1)
    s_mm = _diagonal_blocks(s, mg, k)
    s_inv = np.linalg.inv(s_mm + _ridge_batched(s_mm, ridge)[:, None, None] * np.eye(k))
    q = np.ascontiguousarray(p.transpose(1, 0, 2))  # (Mg, Ng, r)
    qtq = q.transpose(0, 2, 1) @ q
    qtq_inv_qt = np.linalg.inv(qtq + _ridge_batched(qtq, ridge)[:, None, None] * np.eye(r)) @ q.transpose(0, 2, 1)
    t_blocks = t[:, :-1].reshape(n, mg, k)
    # W̄ S over the patch columns, kept current with a rank-K update per channel instead of
    # one skinny product per channel (those are slow in multi-threaded BLAS).
    ws = (dense @ s)[:, :-1]  # (Ng, F); `dense @ s[:, :-1]` would copy the non-contiguous view of s first
    for m in range(mg):
        block = slice(m * k, (m + 1) * k)
        rhs = t_blocks[:, m, :] - ws[:, block] + dense[:, block] @ s_mm[m]
        d[m] = qtq_inv_qt[m] @ rhs @ s_inv[m]
        updated = q[m] @ d[m]
        ws += (updated - dense[:, block]) @ s[block, :-1]
        dense[:, block] = updated
    return d


def _ridge_batched(matrices: np.ndarray, ridge: float) -> np.ndarray:
    """``ridge · mean(diag)`` per matrix (``ridge`` where the diagonal is all zero)."""
    means = np.diagonal(matrices, axis1=-2, axis2=-1).mean(axis=-1)
    return np.where(means > 0, ridge * means, ridge)


def _solve_symmetric(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]
