"""Loading, validating and atomically saving ONNX models.

Loading never modifies the input file. Saving writes into temporary files in
the destination directory and renames them into place, so a crash or Ctrl-C
never leaves a partial model behind. Models whose serialised size would pass
the protobuf 2 GB limit are saved with their tensors in one external data file
next to the model (``<name>.data``).

Models over the protobuf limit
------------------------------
A ``ModelProto`` cannot be serialised past 2 GiB, and loading all of a big
model's external data into one would hold every byte twice for a moment (the
file read, then the protobuf copy) and once per later copy of the model. So when
a model file plus its external data reach :data:`EXTERNAL_DATA_THRESHOLD`,
:func:`load_model` leaves its large main-graph initializers on disk
("disk-backed" tensors): they stay ``EXTERNAL``, with the absolute path of their
data file as location. Tensors whose values dsrewrite reads (the inputs of
conv-like and BatchNormalization nodes) and small tensors are loaded as usual.
Disk-backed tensors pass through the rewrite untouched (onnx-graphsurgeon keeps
their ``TensorProto``), and this module knows how to use them:

* :func:`run_checker` checks the structure, with them as typed graph inputs;
* :func:`onnxruntime_source` gives onnxruntime the model bytes plus the folder
  of their data file, which onnxruntime memory-maps (no copy);
* :func:`save_model` streams their bytes into the output's data file.

Other onnx APIs do not understand an absolute location: save such a model with
:func:`save_model` before handing it to other tools.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper
from onnx.onnx_cpp2py_export import checker as _c_checker

from .errors import InputError, UsageError
from .signals import deferred_interrupts

log = logging.getLogger(__name__)

# protobuf refuses to serialise a message of 2 GiB or more; keep a margin for
# the graph structure and metadata that surround the tensors.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20
# In a model over EXTERNAL_DATA_THRESHOLD, main-graph initializers at least this
# large that no pass reads stay on disk.
DISK_BACKED_MIN_BYTES = 2**20
# When saving with external data, tensors smaller than this stay in the model file.
INLINE_MAX_BYTES = 1024
# Offsets of large tensors in a written data file are multiples of this (mmap-friendly).
LARGE_TENSOR_ALIGNMENT = 64 * 1024
# Ops whose constant inputs the passes read: their tensors are always loaded.
VALUE_READING_OPS = frozenset({"Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "BatchNormalization"})
ORT_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# Models at least this large in memory reach onnxruntime through a temporary file (see onnxruntime_source).
ORT_VIA_FILE_BYTES = 256 * 2**20

_COPY_CHUNK = 16 * 2**20
_SUB_BYTE_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
)
_DATA_FIELDS = (
    "raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
    "external_data", "data_location",
)  # fmt: skip


# -- loading ----------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load and validate a model file, external data included.

    Raises :class:`InputError` with a one-line message for anything unusable:
    a missing file, a directory, bytes that are not an ONNX model, a missing or
    short external data file, a model the ONNX checker rejects, or an IR/opset
    newer than the installed onnx understands. Models over the protobuf limit
    keep their large tensors on disk (see the module docstring).
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"model file not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"model path is a directory, not a file: {path}")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"model path is not a regular file: {path}")
    if info.st_size == 0:
        raise InputError(f"model file is empty: {path}")
    if info.st_size > PROTOBUF_LIMIT:
        raise InputError(
            f"model file {path} is over 2 GiB, more than protobuf can parse (large tensors belong in external data)"
        )
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # DecodeError, RuntimeError, ValueError, ...: whatever protobuf says
        raise InputError(f"not a valid ONNX model: {path} ({_first_line(exc) or 'protobuf parse failed'})") from None
    _check_is_model(model, path)
    _check_fields(model, str(path))
    _check_versions(model, str(path))

    main = [(i, t) for i, t in enumerate(model.graph.initializer) if t.data_location == onnx.TensorProto.EXTERNAL]
    nested = [t for t in _nested_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not main and not nested:
        if check:
            _checked(lambda: run_checker(model), str(path))
        return model

    base = str(path.parent)
    main_places = {i: _external_place(t, base, path) for i, t in main}
    total = info.st_size + sum(p[2] for p in main_places.values())
    total += sum(_external_place(t, base, path)[2] for t in nested)
    large = total >= EXTERNAL_DATA_THRESHOLD
    if large and check:
        # The in-memory checker cannot take a model this size; the path-based one reads no tensor data.
        _checked(lambda: onnx.checker.check_model(str(path)), str(path))
    read = _value_read_names(model) if large else set()
    disk_backed = 0
    try:
        for i, t in main:
            place = main_places[i]
            if large and place[2] >= DISK_BACKED_MIN_BYTES and t.name not in read:
                _set_location(t, *place)
                disk_backed += 1
            else:
                external_data_helper.load_external_data_for_tensor(t, base)
        for t in nested:
            external_data_helper.load_external_data_for_tensor(t, base)
    except OSError as exc:
        raise InputError(f"external data of {path} is unreadable: {exc.strerror or exc}") from None
    except Exception as exc:
        raise InputError(f"external data of {path} is invalid: {_first_line(exc)}") from None
    if disk_backed:
        log.info(
            "%s is %.2f GB: %d large tensor(s) stay on disk and are streamed when needed",
            path, total / 1e9, disk_backed,
        )  # fmt: skip
    if check and not large:
        _checked(lambda: run_checker(model), str(path))
    return model


def check_model(model: onnx.ModelProto, *, source: str = "model") -> None:
    """Validate an in-memory model as :func:`load_model` validates a file; InputError on failure.

    The ONNX checker, the IR/opset versions dsrewrite understands, and what the
    checker lets through but breaks tools later (see ``_check_fields``).
    """
    _check_versions(model, source)
    _check_fields(model, source)
    _checked(lambda: run_checker(model), source)


def run_checker(model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """``onnx.checker.check_model``, also for models with disk-backed tensors or over 2 GB.

    Such models are checked as :func:`without_large_tensors` (their large
    tensors' sizes were checked against their shapes when they were loaded).
    Raises what the checker raises.
    """
    if not _has_large_initializers(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    # The in-memory checker serialises the model and parses it again: two more copies of every weight.
    skeleton = without_large_tensors(model)
    if _serialized_size(skeleton) >= PROTOBUF_LIMIT:
        log.warning("ONNX checker skipped: the model's structure alone is over 2 GB")
        return
    onnx.checker.check_model(skeleton, full_check=full_check)


def without_large_tensors(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large main-graph initializers are typed graph inputs instead.

    Large: disk-backed, or at least :data:`DISK_BACKED_MIN_BYTES`. The copy has
    the model's structure and every shape, without the bulk of its data: cheap
    to hand to the checker or to shape inference, which would otherwise
    serialise (and, past 2 GB, fail on) the whole model.
    """
    skeleton = onnx.ModelProto()
    declared = {vi.name for vi in model.graph.input}

    def initializer(tensor: onnx.TensorProto, graph: onnx.GraphProto, depth: int) -> None:
        if depth == 0 and (is_disk_backed(tensor) or _data_bytes(tensor) >= DISK_BACKED_MIN_BYTES):
            if tensor.name not in declared:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                )
        else:
            graph.initializer.add().CopyFrom(tensor)

    _copy_model(model, skeleton, initializer)
    return skeleton


def _has_large_initializers(model: onnx.ModelProto) -> bool:
    return any(is_disk_backed(t) or _data_bytes(t) >= DISK_BACKED_MIN_BYTES for t in model.graph.initializer)


def check_value_types(model: onnx.ModelProto) -> None:
    """InputError for values onnx-graphsurgeon (which the passes edit graphs with) cannot export.

    It handles tensors, sparse tensors and sequences of tensors; maps and
    optionals (e.g. a classifier's ZipMap output) make its export fail.
    """

    def supported(value_type: onnx.TypeProto) -> bool:
        kind = value_type.WhichOneof("value")
        if kind == "sequence_type":
            inner = value_type.sequence_type.elem_type
            return inner.WhichOneof("value") in (None, "tensor_type")
        return kind in (None, "tensor_type", "sparse_tensor_type")

    def visit(graph: onnx.GraphProto) -> None:
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.HasField("type") and not supported(value.type):
                kind = value.type.WhichOneof("value").replace("_type", "")
                raise InputError(
                    f"value '{value.name}' is a {kind}; dsrewrite handles models whose values are tensors "
                    "or sequences of tensors"
                )
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)

    visit(model.graph)


# -- disk-backed tensors ----------------------------------------------------------------------


def is_disk_backed(tensor: onnx.TensorProto) -> bool:
    """An EXTERNAL tensor whose location is an absolute path (left on disk by :func:`load_model`)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    return any(e.key == "location" and os.path.isabs(e.value) for e in tensor.external_data)


def has_disk_backed_tensors(model: onnx.ModelProto) -> bool:
    return any(is_disk_backed(t) for t in _all_tensors(model))


@contextlib.contextmanager
def onnxruntime_source(model: onnx.ModelProto) -> Iterator[tuple[bytes | str, dict[str, str]]]:
    """What to hand ``onnxruntime.InferenceSession``: ``(model bytes or path, session config entries)``.

    A small model is its bytes. One with disk-backed tensors is its bytes with
    their locations relative to their folder, which the config entry names:
    onnxruntime maps the data file, nothing is copied. A model of at least
    :data:`ORT_VIA_FILE_BYTES` in memory is written to a temporary directory
    with external data (removed when the context exits; create the session
    inside it): from bytes, onnxruntime would briefly hold the serialised model,
    its own parse of it and its tensors, about 3.4x the model; from a file it
    maps the data, about 1x.
    """
    folders = {os.path.dirname(_location(t)) for t in _all_tensors(model) if is_disk_backed(t)}
    if not folders and _serialized_size(model) < min(ORT_VIA_FILE_BYTES, PROTOBUF_LIMIT):
        yield model.SerializeToString(), {}
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

        _copy_model(model, relative, initializer)
        if _serialized_size(relative) < min(ORT_VIA_FILE_BYTES, PROTOBUF_LIMIT):
            yield relative.SerializeToString(), {ORT_EXTERNAL_FOLDER_KEY: folder}
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
    (default :data:`EXTERNAL_DATA_THRESHOLD`) or holds disk-backed tensors, every
    tensor of at least :data:`INLINE_MAX_BYTES` goes to one external data file
    ``<path name>.data`` beside it (disk-backed ones are streamed from their
    file). Both files are written in a temporary directory next to ``path`` and
    renamed into place, the data file first; Ctrl-C is held off between the two
    renames and any failure removes the temporary files.
    """
    path = Path(path)
    check_output_path(path)
    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    if not has_disk_backed_tensors(model) and _serialized_size(model) < threshold:
        atomic_write_bytes(path, model.SerializeToString(deterministic=True))
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
        _fsync_dir(path.parent)
    finally:
        with deferred_interrupts():
            _remove_tree(tmp_dir)
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
            nbytes = _data_bytes(tensor)
            if not disk and (nbytes < INLINE_MAX_BYTES or _itemsize(tensor) is None):
                graph.initializer.add().CopyFrom(tensor)
                return
            align = LARGE_TENSOR_ALIGNMENT if nbytes >= DISK_BACKED_MIN_BYTES else 64
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
            _copy_fields(tensor, stub, skip=_DATA_FIELDS)
            _set_location(stub, data_name, offset, length)

        try:
            _copy_model(model, skeleton, initializer)
        finally:
            for fh in sources.values():
                fh.close()
        data.flush()
        os.fsync(data.fileno())
    size = _serialized_size(skeleton)
    if size >= PROTOBUF_LIMIT:
        raise InputError("cannot save the model: its graph structure alone is over the 2 GB protobuf limit")
    with open(model_path, "wb") as fh:
        fh.write(skeleton.SerializeToString(deterministic=True))
        fh.flush()
        os.fsync(fh.fileno())
    return moved


def _repoint_disk_backed(model: onnx.ModelProto, data_path: str, moved: dict) -> None:
    """Disk-backed tensors whose data file was just replaced now live in the new one (same bytes)."""
    for tensor in _all_tensors(model):
        if not is_disk_backed(tensor):
            continue
        source, start, length = _place(tensor)
        if os.path.realpath(source) == os.path.realpath(data_path) and (source, start) in moved:
            _set_location(tensor, data_path, moved[(source, start)], length)


def check_output_path(path: Path, *, input_path: Path | None = None, overwrite: bool = False) -> None:
    """Refuse output paths that cannot be written, before any work is done.

    Without ``overwrite`` the output may not be the input model, nor one of the
    external data files it references (writing those would change the input).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"output path is a directory: {path}")
    if not parent.exists():
        raise UsageError(f"output directory does not exist: {parent}")
    if not parent.is_dir():
        raise UsageError(f"output directory is not a directory: {parent}")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output directory is not writable: {parent}")
    if input_path is not None and not overwrite:
        with contextlib.suppress(OSError):
            target = path.resolve()
            if target == Path(input_path).resolve():
                raise UsageError(f"output path is the input model: {path} (pass --overwrite to replace it)")
            if target in _input_data_files(Path(input_path)):
                raise UsageError(f"output path is an external data file of the input model: {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it.

    The temp file is removed on any failure, Ctrl-C included.
    """
    path = Path(path)
    with deferred_interrupts():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(OSError):  # mkstemp makes 0600; give the file the mode a plain open() would
            os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with deferred_interrupts(), contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# -- helpers ----------------------------------------------------------------------------------


def _check_is_model(model: onnx.ModelProto, path: Path) -> None:
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"not an ONNX model (no graph or IR version): {path}")
    if not model.opset_import:
        raise InputError(f"not an ONNX model (no opset_import): {path}")


_DATA_TYPES = frozenset(onnx.TensorProto.DataType.values())
_TYPED = {"onnx.TensorProto": "data_type", "onnx.TypeProto.Tensor": "elem_type", "onnx.TypeProto.SparseTensor": "elem_type"}


def _check_fields(model: onnx.ModelProto, source: str) -> None:
    """What protobuf and the checker let through but crashes tools later.

    Invalid UTF-8 in string fields (Python then sees bytes), tensor element
    types that are not ONNX types, raw data longer than the tensor's shape.
    """

    def walk(message) -> None:
        descriptor = message.DESCRIPTOR
        typed = _TYPED.get(descriptor.full_name)
        if typed is not None and getattr(message, typed) not in _DATA_TYPES:
            name = getattr(message, "name", "") or "a value"
            raise InputError(f"not a valid ONNX model: {source} ({name} has unknown element type {getattr(message, typed)})")
        if typed == "data_type" and message.HasField("raw_data"):
            # The checker rejects raw_data that is too short for the shape, not too long.
            expected, stored = _expected_bytes(message), len(message.raw_data)
            if expected is not None and expected != stored:
                raise InputError(
                    f"not a valid ONNX model: {source} (tensor '{message.name}' holds {stored} bytes; "
                    f"its shape {list(message.dims)} needs {expected})"
                )
        for field in descriptor.fields:
            if field.type == field.TYPE_STRING:
                value = getattr(message, field.name)
                if any(isinstance(v, bytes) for v in (value if _is_repeated(field) else [value])):
                    raise InputError(f"not a valid ONNX model: {source} (a name or text field is not UTF-8)")
            elif field.type == field.TYPE_MESSAGE:
                if _is_repeated(field):
                    for item in getattr(message, field.name):
                        walk(item)
                elif message.HasField(field.name):
                    walk(getattr(message, field.name))

    walk(model)


def _check_versions(model: onnx.ModelProto, source: str) -> None:
    if model.ir_version > onnx.IR_VERSION:
        raise InputError(
            f"{source} has IR version {model.ir_version}; the installed onnx supports up to {onnx.IR_VERSION}"
        )
    max_opset = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > max_opset:
            raise InputError(
                f"{source} uses ai.onnx opset {opset.version}; the installed onnx supports up to {max_opset}"
            )


def _checked(run: Callable[[], None], source: str) -> None:
    try:
        run()
    except Exception as exc:  # ValidationError, and assorted C++ errors on garbage
        raise InputError(f"{source} fails the ONNX checker: {_first_line(exc)}") from None


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: main-graph initializers, then those of subgraphs, attributes and functions."""
    yield from model.graph.initializer
    yield from _nested_tensors(model)


def _nested_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The tensors that are not main-graph initializers: subgraph initializers, attribute values."""

    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from sub.initializer
                    yield from in_nodes(sub.node)

    yield from in_nodes(model.graph.node)
    for function in model.functions:
        yield from in_nodes(function.node)


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
        raise InputError(f"external data of {path} is missing or invalid: {_first_line(exc)}") from None
    if length is None:
        length = size - offset
    if offset + length > size:
        raise InputError(f"{where}: needs bytes {offset}..{offset + length} of '{location}', which has {size}")
    expected = _expected_bytes(tensor)
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


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _place(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    entries = {e.key: e.value for e in tensor.external_data}
    offset = int(entries.get("offset") or 0)
    length = int(entries["length"]) if entries.get("length") else os.path.getsize(entries["location"]) - offset
    return entries["location"], offset, length


def _value_read_names(model: onnx.ModelProto) -> set[str]:
    """Names of the tensors that nodes of VALUE_READING_OPS consume, in any graph."""
    names: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in VALUE_READING_OPS:
                names.update(node.input)
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return names


def _itemsize(tensor: onnx.TensorProto) -> int | None:
    """Bytes per element, or None for strings, sub-byte and unknown types."""
    if tensor.data_type in _SUB_BYTE_TYPES or tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # noqa: BLE001 - an unknown enum value
        return None


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    itemsize = _itemsize(tensor)
    return None if itemsize is None else math.prod(tensor.dims) * itemsize


def _data_bytes(tensor: onnx.TensorProto) -> int:
    """Size of the tensor's data, from its shape (no copy of the data is made)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        with contextlib.suppress(KeyError, ValueError):
            return int(entries["length"])
    itemsize = _itemsize(tensor)
    return math.prod(tensor.dims) * (itemsize or 1)


def _serialized_size(message) -> int:
    """ByteSize, or PROTOBUF_LIMIT when protobuf cannot even size it (over 2 GiB)."""
    try:
        return message.ByteSize()
    except Exception:  # noqa: BLE001 - EncodeError past the limit
        return PROTOBUF_LIMIT


def _copy_fields(src, dst, *, skip: Iterable[str] = ()) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except ``skip``."""
    skip = set(skip)
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if _is_repeated(field):
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29; `label` is gone in 7
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _copy_model(
    src: onnx.ModelProto,
    dst: onnx.ModelProto,
    initializer: Callable[[onnx.TensorProto, onnx.GraphProto, int], None],
) -> None:
    """Copy ``src`` into ``dst``, handing each initializer (of every graph) to ``initializer(tensor, graph, depth)``.

    Nothing else is copied through it, so large tensors are never duplicated
    unless the callback copies them.
    """
    _copy_fields(src, dst, skip=("graph",))
    if src.HasField("graph"):
        _copy_graph(src.graph, dst.graph, initializer, 0)


def _copy_graph(src: onnx.GraphProto, dst: onnx.GraphProto, initializer, depth: int) -> None:
    _copy_fields(src, dst, skip=("initializer", "node"))
    for tensor in src.initializer:
        initializer(tensor, dst, depth)
    for node in src.node:
        new = dst.node.add()
        _copy_fields(node, new, skip=("attribute",))
        for attr in node.attribute:
            copy = new.attribute.add()
            if attr.HasField("g") or len(attr.graphs):
                _copy_fields(attr, copy, skip=("g", "graphs"))
                if attr.HasField("g"):
                    _copy_graph(attr.g, copy.g, initializer, depth + 1)
                for sub in attr.graphs:
                    _copy_graph(sub, copy.graphs.add(), initializer, depth + 1)
            else:
                copy.CopyFrom(attr)


def _copy_range(src, offset: int, length: int, dst) -> None:
    src.seek(offset)
    remaining = length
    while remaining > 0:
        chunk = src.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise InputError(f"external data file {src.name} ended early")
        dst.write(chunk)
        remaining -= len(chunk)


def _input_data_files(input_path: Path) -> frozenset[Path]:
    """The external data files a (small) input model file references; empty if it cannot be read."""
    try:
        info = input_path.stat()
    except OSError:
        return frozenset()
    if not stat.S_ISREG(info.st_mode) or info.st_size > 64 * 2**20:
        return frozenset()
    return _referenced_files(input_path.resolve(), info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=8)
def _referenced_files(input_path: Path, mtime_ns: int, size: int) -> frozenset[Path]:
    try:
        model = onnx.load_model(str(input_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - load_model reports unusable inputs later
        return frozenset()
    files = set()
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and _location(tensor):
            with contextlib.suppress(OSError, ValueError):
                files.add((input_path.parent / _location(tensor)).resolve())
    return frozenset(files)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("==>"):
            return line[:300]
    return type(exc).__name__


def _new_file_mode(path: Path) -> int:
    """The replaced file's mode, else what ``open(path, "w")`` would create under the current umask."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort; not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_tree(path: Path) -> None:
    for child in path.iterdir() if path.exists() else ():
        with contextlib.suppress(OSError):
            child.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()
