"""Loading, validating and atomically saving ONNX models.

Loading never modifies the input file. Saving writes into a temporary file in
the destination directory and renames it into place, so a crash or Ctrl-C never
leaves a partial model behind. Models whose serialised size would pass the
protobuf 2 GB limit are saved with their tensors in one external data file
next to the model (``<name>.data``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import InputError, UsageError

log = logging.getLogger(__name__)

# protobuf refuses to serialise a message of 2 GiB or more; keep a margin for
# the graph structure and metadata that surround the tensors.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load and validate a model file, external data included.

    Raises :class:`InputError` with a one-line message for anything unusable:
    a missing file, a directory, bytes that are not an ONNX model, a missing
    external data file, a model the ONNX checker rejects, or an IR/opset newer
    than the installed onnx understands.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        raise InputError(f"model path is a directory, not a file: {path}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror}") from None
    if size == 0:
        raise InputError(f"model file is empty: {path}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"not a valid ONNX model: {path} ({_first_line(exc) or 'protobuf parse failed'})") from None
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    _check_is_model(model, path)
    if _uses_external_data(model):
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (FileNotFoundError, OSError) as exc:
            name = getattr(exc, "filename", None) or str(exc)
            raise InputError(f"external data of {path} is missing or unreadable: {name}") from None
        except Exception as exc:  # malformed external-data entries
            raise InputError(f"external data of {path} is invalid: {_first_line(exc)}") from None
    if check:
        check_model(model, source=str(path))
    return model


def check_model(model: onnx.ModelProto, *, source: str = "model") -> None:
    """Run the ONNX checker plus the version checks dsrewrite relies on."""
    _check_versions(model, source)
    try:
        if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:  # the in-memory checker cannot serialise a model this large
            log.info("model over 2 GB: skipping the in-memory ONNX checker")
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{source} fails the ONNX checker: {_first_line(exc)}") from None
    except Exception as exc:  # the checker raises assorted C++ errors on garbage
        raise InputError(f"{source} fails the ONNX checker: {_first_line(exc)}") from None


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically and return the files written.

    If the serialised model would exceed ``external_data_threshold`` bytes, all
    tensors go to one external data file ``<path name>.data`` beside it. The
    data file is renamed into place before the model that references it.
    """
    path = Path(path)
    check_output_path(path)
    size = model.ByteSize()
    if size < external_data_threshold:
        atomic_write_bytes(path, model.SerializeToString())
        return [path]

    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=".dsrewrite-", dir=path.parent))
    try:
        to_save = onnx.ModelProto()
        to_save.CopyFrom(model)
        # Drop stale external-data references: everything goes to one new file.
        for tensor in external_data_helper._get_all_tensors(to_save):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise InputError("cannot save a model whose tensors were not loaded into memory")
        onnx.save_model(
            to_save,
            str(tmp_dir / path.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        _fsync(tmp_dir / data_name)
        _fsync(tmp_dir / path.name)
        os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_dir / path.name, path)
    finally:
        _remove_tree(tmp_dir)
    return [path, path.parent / data_name]


def check_output_path(path: Path, *, input_path: Path | None = None, overwrite: bool = False) -> None:
    """Refuse output paths that cannot be written, before any work is done."""
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
            if path.resolve() == Path(input_path).resolve():
                raise UsageError(f"output path is the input model: {path} (pass --overwrite to replace it)")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _check_is_model(model: onnx.ModelProto, path: Path) -> None:
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"not an ONNX model (no graph or IR version): {path}")
    if not model.opset_import:
        raise InputError(f"not an ONNX model (no opset_import): {path}")


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


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in external_data_helper._get_all_tensors(model)
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("==>"):
            return line[:300]
    return type(exc).__name__


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _remove_tree(path: Path) -> None:
    for child in path.iterdir() if path.exists() else ():
        with contextlib.suppress(OSError):
            child.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()
