"""Fitted factors per conv and rank, kept in files and read back one at a time.

The curve pass fits every conv at every rank that saves MACs; the output-level probe then runs each of those
fits once, and the re-measurement a few again. Held in memory they add up (VGG16: 220 MB in float32, more
than one pass's statistics), so they are written to a temporary folder as they are made. A store behaves as
the ``{output: {rank: (factors, bias)}}`` dict that ``calibrated_error_curves`` fills, and the probe reads.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping

import numpy as np

from .lowrank import SeparableFactors

Fit = tuple[SeparableFactors, np.ndarray]  # (factors, bias) of one conv at one rank, fitted to calibration data


class FitStore(Mapping[str, "ConvFits"]):
    """``{conv output: ConvFits}``, the arrays on disk in float32 (the probe's runs are float32).

    The folder goes when the store is closed or collected.
    """

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="dsrewrite-fits-")
        self._convs: dict[str, ConvFits] = {}

    def setdefault(self, output: str, default=None) -> "ConvFits":
        """The fits of ``output``, created empty if new (``default`` is ignored: the dict protocol's signature)."""
        if output not in self._convs:
            stem = hashlib.sha1(output.encode()).hexdigest()
            self._convs[output] = ConvFits(os.path.join(self._folder.name, stem))
        return self._convs[output]

    def __getitem__(self, output: str) -> "ConvFits":
        return self._convs[output]

    def __iter__(self) -> Iterator[str]:
        return iter(self._convs)

    def __len__(self) -> int:
        return len(self._convs)

    def close(self) -> None:
        self._folder.cleanup()
        self._convs.clear()


class ConvFits(MutableMapping[int, Fit]):
    """One conv's fits by rank: each is saved when set and loaded when read."""

    def __init__(self, stem: str) -> None:
        self._stem = stem
        self._shapes: dict[int, tuple[int, tuple[int, ...], bool]] = {}  # rank -> (groups, kernel shape, has bias)

    def _path(self, rank: int) -> str:
        return f"{self._stem}_{rank}.npz"

    def __setitem__(self, rank: int, fit: Fit) -> None:
        factors, bias = fit
        arrays = {
            "depthwise": np.asarray(factors.depthwise, dtype=np.float32),
            "pointwise": np.asarray(factors.pointwise, dtype=np.float32),
        }
        if bias is not None:
            arrays["bias"] = np.asarray(bias, dtype=np.float32)
        np.savez(self._path(rank), **arrays)
        self._shapes[rank] = (factors.groups, tuple(factors.kernel_shape), bias is not None)

    def __getitem__(self, rank: int) -> Fit:
        groups, kernel_shape, has_bias = self._shapes[rank]
        with np.load(self._path(rank)) as data:
            factors = SeparableFactors(data["depthwise"], data["pointwise"], groups, kernel_shape)
            return factors, (data["bias"] if has_bias else None)

    def __delitem__(self, rank: int) -> None:
        del self._shapes[rank]
        os.unlink(self._path(rank))

    def __iter__(self) -> Iterator[int]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)
