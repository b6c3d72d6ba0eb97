"""Calibration feeds, activation capture through onnxruntime, and streaming conv statistics.

Feeds come from an ``.npz`` file (one array per model input, samples on axis 0),
a directory of ``.npz`` files (each one feed, so sizes may vary), or any
iterable of ``{input name: array}`` dicts. They are validated against the
model's inputs before any work.

Capture runs the model with the wanted intermediate tensors added as graph
outputs, a small batch of feeds at a time, and hands the activations to
accumulators that keep only fixed-size sums (:class:`RegressionAccumulator`).
Nothing holds activations of more than one batch.
"""

from __future__ import annotations

import logging
import operator
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from .cores import available_cores
from .errors import InputError, UsageError
from .geometry import ConvGeometry
from .graph import declared_dims
from .heap import release_free_memory
from .lowrank import RegressionStats
from .model_io.protos import node_subgraphs
from .verify import session

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

# Patch positions sampled per feed and conv: beyond a few thousand per feed the
# second moments change little while their cost keeps growing.
MAX_POSITIONS_PER_FEED = 4096
# Up to this many feeds every feed gets the full per-feed sample; beyond, the total positions stay fixed.
REFERENCE_FEEDS = 64
# Input bytes per batched capture run. A conv net's activations are many times its input, and onnxruntime keeps
# its arena at the largest batch: at 32 MB the PP-OCR detector (6.5 MB per 736×736 feed) captured 4 feeds at a
# time and peaked at 2.15 GB RSS while fitting; at 8 MB, one at a time, 0.92 GB, for 15% more time in that run.
BATCH_BYTES = 8 * 2**20


# -- feeds ------------------------------------------------------------------------------------


class StoredArray:
    """An array of an uncompressed ``.npz`` member, read from the file a sample (axis-0 slice) at a time.

    ``np.savez`` stores each ``.npy`` uncompressed in the zip, so a sample is a contiguous run of bytes at a known
    offset. The PP-OCR detector's 64 calibration feeds at 736×736 are 416 MB that would otherwise stay resident for
    the whole run.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        """``a[i]`` or ``a[i:j]`` (step 1) along axis 0."""
        whole = not isinstance(index, slice)
        start, stop = (operator.index(index), operator.index(index) + 1) if whole else (index.start or 0, index.stop)
        if not whole and (index.step not in (None, 1) or stop is None) or not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(index)
        per_sample = int(np.prod(self.shape[1:], dtype=np.int64))
        data = np.fromfile(
            self.path, dtype=self.dtype, count=(stop - start) * per_sample,
            offset=self.offset + start * per_sample * self.dtype.itemsize,
        )  # fmt: skip
        data = data.reshape((stop - start, *self.shape[1:]))
        return data[0] if whole else data

    @classmethod
    def members(cls, path: Path) -> dict[str, "StoredArray"]:
        """The members of the ``.npz`` at ``path`` that can be read in place: stored, C-ordered, plain dtype."""
        found = {}
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                    continue
                f.seek(info.header_offset)
                local = f.read(30)  # the local file header: its name and extra field lengths end it
                if local[:4] != b"PK\x03\x04":
                    continue
                name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                f.seek(info.header_offset + 30 + name_length + extra_length)
                try:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        continue
                except ValueError:
                    continue
                if fortran_order or dtype.hasobject or not shape:
                    continue
                found[info.filename] = cls(path, f.tell(), tuple(shape), dtype)
        return found


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple  # int for fixed dims, None for dynamic


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tensor_type = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else np.float32
        dims = declared_dims(vi) or ()
        specs.append(InputSpec(vi.name, np.dtype(dtype), dims))
    return specs


class CalibrationSet:
    """A re-iterable, validated sequence of feeds (at most ``limit``).

    Only one feed is in memory at a time when the source allows it: a directory is read one file per feed on every
    pass, and an uncompressed ``.npz`` (``np.savez``) one sample per feed from the file. A compressed ``.npz`` is
    read once and held. Every feed is validated once, before any work.
    """

    def __init__(self, source, model: onnx.ModelProto, *, limit: int | None = None):
        if limit is not None and limit < 1:
            raise UsageError(f"--calibration-samples must be >= 1, not {limit}")
        self.inputs = model_inputs(model)
        self.limit = limit
        self.casts: dict[str, tuple[str, str]] = {}  # input -> (given float dtype, the model's), for the report
        self.label = "calibration"
        self._files: list[Path] | None = None
        self._feeds: list[Feed] | None = None
        self._stored: tuple[Path, dict[str, "StoredArray"]] | None = None  # an uncompressed .npz, read per pass
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            self.label = f"calibration ({path.name})"
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
                if not files:
                    raise InputError(f"calibration directory has no .npz files: {path}")
                self._files = files[:limit] if limit else files
            elif path.exists():
                arrays = self._load_npz(path)
                if all(isinstance(a, StoredArray) for a in arrays.values()):
                    self._stored = (path, arrays)
                    self._count = sum(1 for _ in self._split_npz(path, arrays))  # validates every sample once
                else:
                    self._feeds = list(self._split_npz(path, arrays))
            else:
                raise InputError(f"calibration data not found: {path}")
        else:
            try:
                feeds = list(source)
            except TypeError:
                raise UsageError("calibration must be a path or an iterable of {input name: array} dicts") from None
            self._feeds = [self._validated(dict(f), f"feed {i}") for i, f in enumerate(feeds[:limit] if limit else feeds)]
        if self._files is None and not len(self):
            raise InputError("calibration data holds no samples")
        # A directory is validated eagerly too: a bad file must fail before any fitting.
        if self._files is not None:
            for f in self._files:
                self._read_feed_file(f)

    def __len__(self) -> int:
        if self._stored is not None:
            return self._count
        return len(self._files) if self._files is not None else len(self._feeds)

    def __iter__(self) -> Iterator[Feed]:
        if self._files is not None:
            for f in self._files:
                yield self._read_feed_file(f)
        elif self._stored is not None:
            yield from self._split_npz(*self._stored)
        else:
            yield from self._feeds

    # -- parsing and validation -------------------------------------------------------------

    def _load_npz(self, path: Path, *, in_memory: bool = False) -> dict[str, "np.ndarray | StoredArray"]:
        """The arrays of the ``.npz`` at ``path``; an uncompressed one is left in the file unless ``in_memory``."""
        if path.is_file() and not zipfile.is_zipfile(path):
            raise InputError(f"cannot read calibration file {path}: not an .npz archive")
        try:
            with np.load(path, allow_pickle=False) as data:
                stored = {} if in_memory else StoredArray.members(path)
                return {k: stored.get(k if k.endswith(".npy") else f"{k}.npy") or data[k] for k in data.files}
        except Exception as exc:
            raise InputError(f"cannot read calibration file {path}: {' '.join(str(exc).split())[:200]}") from None

    def _split_npz(self, path: Path, arrays: Mapping[str, "np.ndarray | StoredArray"]) -> Iterator[Feed]:
        """Samples on axis 0: an array of the input's rank is fed one sample at a time (batch 1)."""
        self._check_names(arrays, str(path))
        counts = set()
        per_input = {}
        for spec in self.inputs:
            arr = arrays[spec.name]
            if arr.ndim == len(spec.dims) + 1:
                per_input[spec.name] = (arr, False)  # axis 0 indexes whole feeds
            elif arr.ndim == len(spec.dims) and arr.ndim >= 1:
                per_input[spec.name] = (arr, True)  # axis 0 is the batch: one sample per feed
            else:
                raise InputError(
                    f"calibration input '{spec.name}' in {path} has rank {arr.ndim}; "
                    f"the model input has rank {len(spec.dims)} (samples go on axis 0)"
                )
            counts.add(arr.shape[0])
        if len(counts) > 1:
            raise InputError(f"calibration inputs in {path} have different sample counts: {sorted(counts)}")
        n = counts.pop() if counts else 0
        if self.limit:
            n = min(n, self.limit)
        for i in range(n):
            feed = {name: (arr[i : i + 1] if keep_batch else arr[i]) for name, (arr, keep_batch) in per_input.items()}
            yield self._validated(feed, f"{path.name} sample {i}")

    def _read_feed_file(self, path: Path) -> Feed:
        arrays = self._load_npz(path, in_memory=True)
        return self._validated(arrays, str(path))

    def _check_names(self, feed: Mapping[str, np.ndarray], where: str) -> None:
        names = {s.name for s in self.inputs}
        unknown = sorted(set(feed) - names)
        if unknown:
            raise InputError(f"calibration data {where} has unknown input '{unknown[0]}' (model inputs: {', '.join(sorted(names))})")
        missing = sorted(names - set(feed))
        if missing:
            raise InputError(f"calibration data {where} lacks model input '{missing[0]}'")

    def _cast(self, arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
        """``arr`` in the model's float type; InputError when finite values do not fit in it."""
        with np.errstate(over="ignore"):
            cast = arr.astype(spec.dtype)
        if np.isfinite(arr).all() and not np.isfinite(cast).all():
            raise InputError(
                f"calibration input '{spec.name}' ({where}) has {arr.dtype} values too large for the model's {spec.dtype}"
            )
        self.casts[spec.name] = (str(arr.dtype), str(spec.dtype))
        return cast

    def _validated(self, feed: Mapping[str, np.ndarray], where: str) -> Feed:
        self._check_names(feed, where)
        out = {}
        for spec in self.inputs:
            arr = np.asarray(feed[spec.name])
            if arr.dtype != spec.dtype and arr.dtype.kind == "f" and spec.dtype.kind == "f":
                arr = self._cast(arr, spec, where)  # numpy's default float64, or float16, for a float32 input
            if arr.dtype != spec.dtype:
                raise InputError(
                    f"calibration input '{spec.name}' ({where}) has dtype {arr.dtype}; the model expects {spec.dtype}"
                )
            if arr.ndim != len(spec.dims):
                raise InputError(
                    f"calibration input '{spec.name}' ({where}) has rank {arr.ndim}; the model expects {len(spec.dims)}"
                )
            for axis, (got, want) in enumerate(zip(arr.shape, spec.dims)):
                if want is not None and got != want:
                    raise InputError(
                        f"calibration input '{spec.name}' ({where}) has shape {list(arr.shape)}; "
                        f"the model fixes dim {axis} to {want}"
                    )
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise InputError(f"calibration input '{spec.name}' ({where}) holds NaN or Inf values")
            out[spec.name] = arr
        return out


# -- capture ----------------------------------------------------------------------------------


def capture(
    model: onnx.ModelProto, tensor_names: Sequence[str], feeds: Iterable[Feed], *, batch_size: int = 16
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Yield ``(values of tensor_names, number of feeds)`` for groups of feeds (graph inputs pass through).

    Consecutive feeds of equal shapes are concatenated on axis 0 into runs of up
    to ``batch_size`` when every input's batch dim is dynamic: far fewer
    onnxruntime calls, and memory still bounded by one batch. If a batched run
    fails (a model that hard-codes batch 1 inside), it falls back to one feed at a time.
    """
    graph_inputs = {vi.name for vi in model.graph.input}
    outputs = [n for n in dict.fromkeys(tensor_names) if n not in graph_inputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    # Only the wanted tensors are outputs, and only the nodes and weights they depend on are kept: onnxruntime
    # runs every node it is given, so capturing VGG16's second conv cost a whole run and all its weights.
    _keep_only_what_computes(probe.graph, outputs)
    existing = {o.name: o for o in probe.graph.output}
    elem_types = {vi.name: vi.type.tensor_type.elem_type for vi in probe.graph.value_info}
    del probe.graph.output[:]
    for name in outputs:
        probe.graph.output.append(
            existing.get(name)
            or onnx.helper.make_tensor_value_info(name, elem_types.get(name, onnx.TensorProto.FLOAT), None)
        )
    sess = None
    if outputs:
        try:
            # Unoptimised: onnxruntime's layout transforms and prepacked weights are for speed; captured
            # tensors are graph outputs anyway, and for VGG16 they cost 0.15 GB more than the captured values.
            sess = session(probe, threads=available_cores(), optimize=False)
        except Exception as exc:
            raise InputError(f"the model does not load in onnxruntime: {' '.join(str(exc).split())[:300]}") from None
    probe = None  # onnxruntime has its own copy
    can_batch = batch_size > 1 and all(spec.dims and spec.dims[0] is None for spec in model_inputs(model))

    def run(feed: Feed) -> dict[str, np.ndarray]:
        values = dict(zip(outputs, sess.run(outputs, feed))) if outputs else {}
        for name in tensor_names:
            if name in graph_inputs:
                values[name] = feed[name]
        return values

    batching = [can_batch]
    try:
        for group in batch_groups(feeds, batch_size if can_batch else 1):
            if len(group) == 1:
                yield run(group[0]), 1
                continue
            if batching[0]:
                merged = {name: np.concatenate([f[name] for f in group], axis=0) for name in group[0]}
                try:
                    yield run(merged), len(group)
                    continue
                except Exception:  # noqa: BLE001 - the model rejects batching
                    log.info("batched capture failed; capturing one feed at a time")
                    batching[0] = False
            # One feed at a time, concatenated so callers see the same grouping either way.
            parts = [run(feed) for feed in group]
            yield {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}, len(group)
    finally:
        sess = None
        release_free_memory()  # the session's arena and weights, left in the heap otherwise


def _keep_only_what_computes(graph: onnx.GraphProto, outputs: Sequence[str]) -> None:
    """Remove the nodes and initializers that none of ``outputs`` depends on (graph inputs stay, but for
    initializers listed as inputs)."""
    needed = set(outputs)
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            for subgraph in node_subgraphs(node):  # a subgraph may read any outer tensor
                needed.update(name for inner in _all_nodes(subgraph) for name in inner.input if name)
    if len(kept) < len(graph.node):
        kept.reverse()
        copies = [onnx.NodeProto() for _ in kept]
        for copy, node in zip(copies, kept):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
    removed = set()
    for index in reversed(range(len(graph.initializer))):  # in place: a rebuilt list would copy the weights
        name = graph.initializer[index].name
        if name not in needed:
            removed.add(name)
            del graph.initializer[index]
    for index in reversed(range(len(graph.input))):  # an old model lists its weights as inputs too
        if graph.input[index].name in removed:
            del graph.input[index]


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for subgraph in node_subgraphs(node):
            yield from _all_nodes(subgraph)


def batch_groups(feeds: Iterable[Feed], max_feeds: int) -> Iterator[list[Feed]]:
    """Consecutive feeds of equal shapes, grouped for one batched run: at most ``max_feeds`` of them and about
    ``BATCH_BYTES`` of inputs (large images batch fewer at a time), at least one."""
    group: list[Feed] = []
    limit = 1
    for feed in feeds:
        if group and (len(group) >= limit or _shapes(feed) != _shapes(group[0])):
            yield group
            group = []
        if not group:
            feed_bytes = max(1, sum(np.asarray(v).nbytes for v in feed.values()))
            limit = int(max(1, min(max_feeds, BATCH_BYTES // feed_bytes)))
        group.append(feed)
    if group:
        yield group


def _shapes(feed: Feed) -> dict[str, tuple]:
    return {k: v.shape for k, v in feed.items()}


# -- patches and statistics -------------------------------------------------------------------


def extract_patches(x: np.ndarray, geometry: ConvGeometry, positions: np.ndarray | slice | None = None) -> np.ndarray:
    """im2col: ``x (B, M, *spatial)`` -> ``(M, K, P)`` with ``P = B·output positions``.

    With ``positions`` (flat indices into those ``P``, as :func:`sample_positions`
    gives), only those columns are built: the cost follows the sample, not the image.
    """
    d = len(geometry.kernel_shape)
    b, m = x.shape[:2]
    spatial = x.shape[2:]
    pads = geometry.explicit_pads(spatial)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + d]) for i in range(d)])
    out = geometry.output_spatial(spatial)
    if positions is not None and not isinstance(positions, slice):
        batch, flat = np.divmod(np.asarray(positions), int(np.prod(out)))
        coords = np.unravel_index(flat, out)
        taps = []
        for offset in np.ndindex(*geometry.kernel_shape):
            index = tuple(coords[i] * geometry.strides[i] + offset[i] * geometry.dilations[i] for i in range(d))
            taps.append(padded[(batch, slice(None)) + index])  # (P, M)
        return np.stack(taps, axis=2).transpose(1, 2, 0)  # (M, K, P)
    taps = []
    for offset in np.ndindex(*geometry.kernel_shape):
        index = tuple(
            slice(offset[i] * geometry.dilations[i], offset[i] * geometry.dilations[i] + (out[i] - 1) * geometry.strides[i] + 1, geometry.strides[i])
            for i in range(d)
        )
        taps.append(padded[(slice(None), slice(None)) + index])
    stacked = np.stack(taps, axis=2)  # (B, M, K, *out)
    return stacked.reshape(b, m, len(taps), -1).transpose(1, 2, 0, 3).reshape(m, len(taps), -1)


def flatten_output(y: np.ndarray) -> np.ndarray:
    """``y (B, N, *spatial)`` -> ``(N, P)`` in the same position order as :func:`extract_patches`."""
    b, n = y.shape[:2]
    return y.reshape(b, n, -1).transpose(1, 0, 2).reshape(n, -1)


def positions_per_feed(features: int, groups: int, feeds: int = REFERENCE_FEEDS) -> float:
    """How many patch positions per feed to sample for a conv with ``features`` (= (M/g)·K) per group.

    Accumulating ``Σ x̄ x̄ᵀ`` costs ``g·(F+1)²`` per position, so wide layers get
    fewer positions per feed (never fewer than 256) and narrow layers more (up to
    4096), at ``REFERENCE_FEEDS`` feeds. Beyond that the total is held at
    ``REFERENCE_FEEDS`` feeds' worth, spread over all feeds: more feeds bring more
    diverse positions at the same accumulation time and memory. With 64 feeds
    even the widest layers see ``16·F`` positions or more for ``F ≤ 1024``;
    where positions are still scarce the kernel prior of the fit
    (``RegressionStats.kernel_prior``) takes over. May be fractional: the
    caller rounds per batch of feeds.
    """
    budget = 2.5e8 / (groups * (features + 1) ** 2)
    per_feed = min(MAX_POSITIONS_PER_FEED, max(256, budget))
    return per_feed * min(1.0, REFERENCE_FEEDS / max(int(feeds), 1))


def sample_positions(count: int, rng: np.random.Generator, limit: int) -> np.ndarray | slice:
    """At most ``limit`` of ``count`` positions, drawn without replacement, in order."""
    if count <= limit:
        return slice(None)
    return np.sort(rng.choice(count, size=limit, replace=False))


# Above this size the second moments are updated a band of rows at a time (the product's temporary is one band).
ADD_BAND_BYTES = 16 * 2**20


class RegressionAccumulator:
    """Streams ``Σ x̄ x̄ᵀ``, ``Σ y x̄ᵀ``, ``Σ ‖y‖²`` and ``Σ y`` of one conv (see ``lowrank.RegressionStats``).

    Memory: ``g·(F+1)² + N·(F+1) + N`` float64 numbers with ``F = (M/g)·K``,
    whatever the number of samples.
    """

    def __init__(self, in_channels: int, out_channels: int, taps: int, groups: int):
        self.groups = groups
        self.features = (in_channels // groups) * taps
        self.s = np.zeros((groups, self.features + 1, self.features + 1))
        self.t = np.zeros((groups, out_channels // groups, self.features + 1))
        self.energy = 0.0
        self.y_sum = np.zeros(out_channels)
        self.count = 0

    def add(self, patches: np.ndarray, y: np.ndarray) -> None:
        """``patches (M, K, P)`` and outputs ``y (N, P)`` at the same positions."""
        g, positions = self.groups, patches.shape[2]
        x = np.ones((g, self.features + 1, positions))
        x[:, :-1, :] = patches.reshape(g, self.features, positions)
        y = y.astype(np.float64)
        xt = x.transpose(0, 2, 1)
        if self.s.nbytes <= ADD_BAND_BYTES:
            self.s += x @ xt  # batched matmul: BLAS, unlike einsum
        else:  # `s += x xᵀ` would first make all of x xᵀ: 170 MB more for a 512-channel 3×3 conv
            band = max(1, ADD_BAND_BYTES // (8 * (self.features + 1)))
            for gi in range(g):
                for a in range(0, self.features + 1, band):
                    self.s[gi, a : a + band] += x[gi, a : a + band] @ xt[gi]
        self.t += y.reshape(g, -1, positions) @ xt
        self.energy += float(np.vdot(y, y))
        self.y_sum += y.sum(axis=1)
        self.count += positions

    def finish(self) -> RegressionStats:
        centred = self.energy - float((self.y_sum**2).sum()) / max(self.count, 1)
        return RegressionStats(s=self.s, t=self.t, energy=self.energy, centred_energy=max(centred, 1e-30), count=self.count)


HALF_LIMIT = 6.0e4  # float16's largest finite value is 65504


class RowSample:
    """A uniform sample, without replacement, of at most ``capacity`` positions' patches and outputs, streamed.

    Each position gets a random key and the ``capacity`` smallest keys are kept
    (priority sampling), so every position seen is equally likely to be in the
    sample whatever the batching. The patches are held as float16 while every value fits in its range
    (``HALF_LIMIT``), else float32, and the outputs as float32: at most ``capacity·(M·K + N)·4`` bytes. float16's
    relative rounding (5e-4) is far below the sampling noise of the correction it feeds, and it halves the
    largest array of a fit (0.24 GB of patches for a 512-channel 3×3 conv).
    """

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity = int(capacity)
        self.rng = rng
        self.keys = np.empty(0)  # the key of each filled row
        self._x: np.ndarray | None = None  # (capacity, M·K), filled rows first
        self._y: np.ndarray | None = None  # (capacity, N)

    @property
    def x(self) -> np.ndarray | None:
        """The sampled patch rows ``(rows, M·K)`` (float16 or float32), None before any."""
        return None if self._x is None else self._x[: len(self.keys)]

    @property
    def y(self) -> np.ndarray | None:
        """The outputs at the same rows ``(rows, N)``."""
        return None if self._y is None else self._y[: len(self.keys)]

    @staticmethod
    def rows_within(in_channels: int, out_channels: int, taps: int, byte_budget: int, max_rows: int) -> int:
        """Rows of a float32 sample of ``M·K`` patch values and ``N`` outputs that fit in ``byte_budget``."""
        return int(max(0, min(max_rows, byte_budget // (4 * (in_channels * taps + out_channels)))))

    @property
    def nbytes(self) -> int:
        return 0 if self.x is None else self.x.nbytes + self.y.nbytes

    def add(self, patches: np.ndarray, y: np.ndarray) -> None:
        """``patches (M, K, P)`` and outputs ``y (N, P)`` at the same positions.

        Rows are written into place: the evicted rows' slots, then empty ones. Merging by concatenation held
        the sample twice (2 × 0.27 GB for a 512-channel 3×3 conv).
        """
        count = patches.shape[2]
        keys = self.rng.random(count)
        filled = len(self.keys)
        keep = np.flatnonzero(keys < self.keys.max()) if filled >= self.capacity else np.arange(count)
        if not len(keep):
            return
        keys = keys[keep]
        if filled + len(keys) > self.capacity:  # the capacity smallest keys of old and new stay
            chosen = np.argpartition(np.concatenate([self.keys, keys]), self.capacity - 1)[: self.capacity]
            kept = np.zeros(filled, dtype=bool)
            kept[chosen[chosen < filled]] = True
            new = np.sort(chosen[chosen >= filled] - filled)
            slots = np.concatenate([np.flatnonzero(~kept), np.arange(filled, self.capacity)])
        else:
            new = np.arange(len(keys))
            slots = np.arange(filled, filled + len(keys))
        columns = keep[new]
        values = patches.reshape(-1, count)[:, columns]
        half = bool(np.abs(values).max(initial=0.0) <= HALF_LIMIT)
        if self._x is None:  # untouched pages of an empty array take no memory until rows arrive
            self._x = np.empty((self.capacity, values.shape[0]), dtype=np.float16 if half else np.float32)
            self._y = np.empty((self.capacity, y.shape[0]), dtype=np.float32)
        elif not half and self._x.dtype == np.float16:  # a value past float16's range: widen what is held
            self._x = self._x.astype(np.float32)
        self._x[slots] = values.T
        self._y[slots] = y[:, columns].T
        updated = np.empty(min(self.capacity, filled + len(keys)))
        updated[:filled] = self.keys
        updated[slots] = keys[new]
        self.keys = updated
