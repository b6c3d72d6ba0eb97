"""External data: tensors stored beside the model file, and models over the 2 GB protobuf limit.

Models whose serialised size would pass the protobuf limit are saved with their
tensors in one external data file next to the model (``<name>.data``).

A ``ModelProto`` cannot be serialised past 2 GiB, and loading all of a big
model's external data into one would hold every byte twice for a moment (the
file read, then the protobuf copy) and once per later copy of the model. So when
a model file plus its external data reach :data:`~.limits.EXTERNAL_DATA_THRESHOLD`,
loading leaves its large main-graph initializers on disk ("disk-backed"
tensors): they stay ``EXTERNAL``, with the absolute path of their data file as
location. Tensors whose values dsrewrite reads (the inputs of conv-like and
BatchNormalization nodes) and small tensors are loaded as usual. Disk-backed
tensors pass through the rewrite untouched (onnx-graphsurgeon keeps their
``TensorProto``), and the model_io package knows how to use them:

* ``run_checker`` checks the structure, with them as typed graph inputs
  (:func:`without_large_tensors`);
* :func:`onnxruntime_source` gives onnxruntime the model bytes plus the folder
  of their data file, which onnxruntime memory-maps (no copy);
* :func:`save_model` streams their bytes into the output's data file.

Other onnx APIs do not understand an absolute location: save such a model with
:func:`save_model` before handing it to other tools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx
from onnx import external_data_helper, numpy_helper
from onnx.onnx_cpp2py_export import checker as _c_checker

from ..errors import InputError
from ..signals import deferred_interrupts
from . import limits
from .files import atomic_write_bytes, check_output_path, fsync_dir, remove_tree
from .protos import (
    all_tensors,
    copy_fields,
    copy_model,
    data_bytes,
    expected_bytes,
    external_location,
    first_line,
    itemsize,
    nested_tensors,
    node_subgraphs,
    serialized_below,
    serialized_size,
)

# The package's name, as before model_io was split: `-v` output shows it.
log = logging.getLogger(__package__)

# Ops whose constant inputs the passes read: their tensors are always loaded.
VALUE_READING_OPS = frozenset({"Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "BatchNormalization"})
ORT_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"

_COPY_CHUNK = 16 * 2**20
_DATA_FIELDS = (
    "raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
    "external_data", "data_location",
)  # fmt: skip


# -- loading ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ExternalTensors:
    """A parsed model's external tensors, their places checked but none of their data read yet."""

    path: Path  # the model file
    main: list[tuple[onnx.TensorProto, tuple[str, int, int]]]  # main-graph initializers, (file, offset, length)
    nested: list[onnx.TensorProto]
    total: int  # bytes of the model file plus all its external data
    large: bool  # total reaches EXTERNAL_DATA_THRESHOLD: big tensors stay on disk


def find_external_tensors(model: onnx.ModelProto, path: Path, file_size: int) -> ExternalTensors | None:
    """The external tensors of ``model`` (read from ``path``), or None if it has none.

    Every place is validated without reading data: InputError for a missing
    location, a bad offset or length, a data file that is missing, outside the
    model's folder or too short, or a length that does not match the shape.
    """
    main = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    nested = [t for t in nested_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not main and not nested:
        return None
    base = str(path.parent)
    places = [_external_place(t, base, path) for t in main]
    total = file_size + sum(p[2] for p in places)
    total += sum(_external_place(t, base, path)[2] for t in nested)
    return ExternalTensors(path, list(zip(main, places)), nested, total, total >= limits.EXTERNAL_DATA_THRESHOLD)


def load_external_tensors(model: onnx.ModelProto, found: ExternalTensors) -> None:
    """Read the external tensors into ``model``; in a large model, leave the big ones no pass reads on disk."""
    path, base = found.path, str(found.path.parent)
    read = _value_read_names(model) if found.large else set()
    disk_backed = 0
    try:
        for tensor, place in found.main:
            if found.large and place[2] >= limits.DISK_BACKED_MIN_BYTES and tensor.name not in read:
                _set_location(tensor, *place)
                disk_backed += 1
            else:
                external_data_helper.load_external_data_for_tensor(tensor, base)
        for tensor in found.nested:
            external_data_helper.load_external_data_for_tensor(tensor, base)
    except OSError as exc:
        raise InputError(f"external data of {path} is unreadable: {exc.strerror or exc}") from None
    except Exception as exc:
        raise InputError(f"external data of {path} is invalid: {first_line(exc)}") from None
    if disk_backed:
        log.info(
            "%s is %.2f GB: %d large tensor(s) stay on disk and are streamed when needed",
            path, found.total / 1e9, disk_backed,
        )  # fmt: skip


def _external_place(tensor: onnx.TensorProto, base: str, path: Path) -> tuple[str, int, int]:
    """(absolute file, offset, length) of an external tensor, validated without reading its data."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    where = f"external data of {path}, tensor '{tensor.name}'"
    if not location:
        raise InputError(f"{where}: no location")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise InputError(f"{where}: offset/length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"{where}: negative offset or length")
    try:
        size = _external_file_size(base, location, tensor.name)
    except Exception as exc:
        raise InputError(f"external data of {path} is missing or invalid: {first_line(exc)}") from None
    if length is None:
        length = size - offset
    if offset + length > size:
        raise InputError(f"{where}: needs bytes {offset}..{offset + length} of '{location}', which has {size}")
    expected = expected_bytes(tensor)
    if expected is not None and expected != length:
        raise InputError(f"{where}: {length} bytes stored, its shape and type need {expected}")
    return os.path.realpath(os.path.join(base, location)), offset, length


def _external_file_size(base: str, location: str, name: str) -> int:
    """Size of an external data file, opened under onnx's own rules (relative, inside ``base``, a regular file)."""
    opener = getattr(_c_checker, "_open_external_data", None)
    if opener is not None:
        fd = opener(base, location, name, True)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)
    full = os.path.realpath(os.path.join(base, location))  # older onnx: the same rules, checked here
    if os.path.isabs(location) or os.path.commonpath([full, os.path.realpath(base)]) != os.path.realpath(base):
        raise ValueError(f"location '{location}' of tensor '{name}' is not a relative path inside {base}")
    if not os.path.isfile(full):
        raise ValueError(f"external data file '{location}' of tensor '{name}' is missing or not a regular file")
    return os.path.getsize(full)


def _value_read_names(model: onnx.ModelProto) -> set[str]:
    """Names of the tensors that nodes of VALUE_READING_OPS consume, in any graph."""
    names: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in VALUE_READING_OPS:
                names.update(node.input)
            for sub in node_subgraphs(node):
                visit(sub)

    visit(model.graph)
    return names


# -- disk-backed and large tensors ------------------------------------------------------------


def is_disk_backed(tensor: onnx.TensorProto) -> bool:
    """An EXTERNAL tensor whose location is an absolute path (left on disk by ``load_model``)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    return any(e.key == "location" and os.path.isabs(e.value) for e in tensor.external_data)


def has_disk_backed_tensors(model: onnx.ModelProto) -> bool:
    return any(is_disk_backed(t) for t in all_tensors(model))


def has_large_initializers(model: onnx.ModelProto) -> bool:
    return any(is_disk_backed(t) or data_bytes(t) >= limits.DISK_BACKED_MIN_BYTES for t in model.graph.initializer)


def without_large_tensors(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large main-graph initializers are typed graph inputs instead.

    Large: disk-backed, or at least :data:`~.limits.DISK_BACKED_MIN_BYTES`. The
    copy has the model's structure and every shape, without the bulk of its
    data: cheap to hand to the checker or to shape inference, which would
    otherwise serialise (and, past 2 GB, fail on) the whole model.
    """
    skeleton = onnx.ModelProto()
    declared = {vi.name for vi in model.graph.input}

    def initializer(tensor: onnx.TensorProto, graph: onnx.GraphProto, depth: int) -> None:
        if depth == 0 and (is_disk_backed(tensor) or data_bytes(tensor) >= limits.DISK_BACKED_MIN_BYTES):
            if tensor.name not in declared:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                )
        else:
            graph.initializer.add().CopyFrom(tensor)

    copy_model(model, skeleton, initializer)
    return skeleton


@contextlib.contextmanager
def onnxruntime_source(model: onnx.ModelProto) -> Iterator[tuple[bytes | str, dict[str, str]]]:
    """What to hand ``onnxruntime.InferenceSession``: ``(model bytes or path, session config entries)``.

    A small model is its bytes. One with disk-backed tensors is its bytes with
    their locations relative to their folder, which the config entry names:
    onnxruntime maps the data file, nothing is copied. A model of at least
    :data:`~.limits.ORT_VIA_FILE_BYTES` in memory is written to a temporary
    directory with external data (removed when the context exits; create the
    session inside it): from bytes, onnxruntime would briefly hold the
    serialised model, its own parse of it and its tensors, about 3.4x the model;
    from a file it maps the data, about 1x.
    """
    folders = {os.path.dirname(external_location(t)) for t in all_tensors(model) if is_disk_backed(t)}
    limit = min(limits.ORT_VIA_FILE_BYTES, limits.PROTOBUF_LIMIT)
    data = None if folders else serialized_below(model, limit)
    if data is not None:
        yield data, {}
        return
    if folders:
        folder = os.path.commonpath(sorted(folders))
        relative = onnx.ModelProto()

        def initializer(tensor: onnx.TensorProto, graph: onnx.GraphProto, depth: int) -> None:
            copy = graph.initializer.add()
            copy.CopyFrom(tensor)
            if is_disk_backed(tensor):
                for entry in copy.external_data:
                    if entry.key == "location":
                        entry.value = os.path.relpath(entry.value, folder)

        copy_model(model, relative, initializer)
        data = serialized_below(relative, limit)
        if data is not None:
            yield data, {ORT_EXTERNAL_FOLDER_KEY: folder}
            return
        del relative
    with tempfile.TemporaryDirectory(prefix="dsrewrite-ort-", ignore_cleanup_errors=True) as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_model(model, path, external_data_threshold=0)
        yield path, {}


# -- saving -----------------------------------------------------------------------------------


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data_threshold: int | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically and return the files written.

    If the serialised model would reach ``external_data_threshold`` bytes
    (default :data:`~.limits.EXTERNAL_DATA_THRESHOLD`) or holds disk-backed
    tensors, every tensor of at least :data:`~.limits.INLINE_MAX_BYTES` goes to
    one external data file ``<path name>.data`` beside it (disk-backed ones are
    streamed from their file). Both files are written in a temporary directory
    next to ``path`` and renamed into place, the data file first; Ctrl-C is held
    off between the two renames and any failure removes the temporary files.
    """
    path = Path(path)
    check_output_path(path)
    threshold = limits.EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    data = None if has_disk_backed_tensors(model) else serialized_below(model, threshold, deterministic=True)
    if data is not None:
        atomic_write_bytes(path, data)
        return [path]

    data_name = path.name + ".data"
    data_path = path.parent / data_name
    with deferred_interrupts():
        tmp_dir = Path(tempfile.mkdtemp(prefix=".dsrewrite-", dir=path.parent))
    try:
        moved = _write_with_external_data(model, tmp_dir / path.name, data_name)
        with deferred_interrupts():  # both files or neither
            os.replace(tmp_dir / data_name, data_path)
            os.replace(tmp_dir / path.name, path)
        fsync_dir(path.parent)
    finally:
        with deferred_interrupts():
            remove_tree(tmp_dir)
    _repoint_disk_backed(model, str(data_path.resolve()), moved)
    return [path, data_path]


def _write_with_external_data(model: onnx.ModelProto, model_path: Path, data_name: str) -> dict:
    """Write the model file and its data file; return ``{(source, offset): new offset}`` of streamed tensors."""
    skeleton = onnx.ModelProto()
    sources: dict[str, object] = {}
    moved: dict[tuple[str, int], int] = {}
    with open(model_path.parent / data_name, "wb") as data:

        def initializer(tensor: onnx.TensorProto, graph: onnx.GraphProto, depth: int) -> None:
            disk = is_disk_backed(tensor)
            nbytes = data_bytes(tensor)
            if not disk and (nbytes < limits.INLINE_MAX_BYTES or itemsize(tensor) is None):
                graph.initializer.add().CopyFrom(tensor)
                return
            align = limits.LARGE_TENSOR_ALIGNMENT if nbytes >= limits.DISK_BACKED_MIN_BYTES else 64
            offset = -(-data.tell() // align) * align
            if offset > data.tell():
                data.write(b"\0" * (offset - data.tell()))
            if disk:
                source, start, length = _place(tensor)
                if source not in sources:
                    sources[source] = open(source, "rb")  # noqa: SIM115 (closed below)
                _copy_range(sources[source], start, length, data)
                moved[(source, start)] = offset
            else:
                blob = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                length = len(blob)
                data.write(blob)
                del blob
            stub = graph.initializer.add()
            copy_fields(tensor, stub, skip=_DATA_FIELDS)
            _set_location(stub, data_name, offset, length)

        try:
            copy_model(model, skeleton, initializer)
        finally:
            for fh in sources.values():
                fh.close()
        data.flush()
        os.fsync(data.fileno())
    size = serialized_size(skeleton)
    if size >= limits.PROTOBUF_LIMIT:
        raise InputError("cannot save the model: its graph structure alone is over the 2 GB protobuf limit")
    with open(model_path, "wb") as fh:
        fh.write(skeleton.SerializeToString(deterministic=True))
        fh.flush()
        os.fsync(fh.fileno())
    return moved


def _repoint_disk_backed(model: onnx.ModelProto, data_path: str, moved: dict) -> None:
    """Disk-backed tensors whose data file was just replaced now live in the new one (same bytes)."""
    for tensor in all_tensors(model):
        if not is_disk_backed(tensor):
            continue
        source, start, length = _place(tensor)
        if os.path.realpath(source) == os.path.realpath(data_path) and (source, start) in moved:
            _set_location(tensor, data_path, moved[(source, start)], length)


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _place(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    entries = {e.key: e.value for e in tensor.external_data}
    offset = int(entries.get("offset") or 0)
    length = int(entries["length"]) if entries.get("length") else os.path.getsize(entries["location"]) - offset
    return entries["location"], offset, length


def _copy_range(src, offset: int, length: int, dst) -> None:
    src.seek(offset)
    remaining = length
    while remaining > 0:
        chunk = src.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise InputError(f"external data file {src.name} ended early")
        dst.write(chunk)
        remaining -= len(chunk)
