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

from dataclasses import dataclass

import numpy as np


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
