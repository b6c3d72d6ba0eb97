"""Writing files so that a crash or Ctrl-C never leaves a partial one, and refusing bad output paths early.

A write goes to a temporary file in the destination directory, is fsynced, then
renamed over the target, and the directory is fsynced after the rename. Making
and removing temporary files and the renames themselves run under
:func:`dsrewrite.signals.deferred_interrupts`: a Ctrl-C waits for them to finish.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import tempfile
from pathlib import Path

import onnx

from ..errors import UsageError
from ..signals import deferred_interrupts
from .protos import all_tensors, external_location


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
            # Only an existing file can be one the input reads its weights from (a missing one fails the load):
            # a new output path needs no parse of the input.
            if target.exists() and target in _input_data_files(Path(input_path)):
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
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort; not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a flat temporary directory and its files, ignoring what is already gone."""
    for child in path.iterdir() if path.exists() else ():
        with contextlib.suppress(OSError):
            child.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()


def _new_file_mode(path: Path) -> int:
    """The replaced file's mode, else what ``open(path, "w")`` would create under the current umask."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


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
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and external_location(tensor):
            with contextlib.suppress(OSError, ValueError):
                files.add((input_path.parent / external_location(tensor)).resolve())
    return frozenset(files)
