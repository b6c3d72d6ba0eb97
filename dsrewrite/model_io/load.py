"""Loading and validating ONNX models: one-line InputErrors for anything dsrewrite cannot use.

Loading never modifies the input file. A model is checked at three levels: the
file (exists, regular, not empty, parsable), what the ONNX checker says, and
what the checker lets through but breaks tools later (``_check_fields``,
``_check_versions``). External data is found and read by :mod:`.external`.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Callable

import onnx

from ..errors import InputError
from . import limits
from .external import (
    find_external_tensors,
    has_large_initializers,
    load_external_tensors,
    without_large_tensors,
)
from .protos import expected_bytes, first_line, is_repeated, node_subgraphs, serialized_size

# The package's name, as before model_io was split: `-v` output shows it.
log = logging.getLogger(__package__)

_DATA_TYPES = frozenset(onnx.TensorProto.DataType.values())
_TYPED = {"onnx.TensorProto": "data_type", "onnx.TypeProto.Tensor": "elem_type", "onnx.TypeProto.SparseTensor": "elem_type"}


def load_model(path: str | os.PathLike, *, check: bool = True, repairs: list[str] | None = None) -> onnx.ModelProto:
    """Load and validate a model file, external data included.

    With ``repairs`` (a list), a model the checker rejects only for what onnxruntime accepts
    (see :func:`repaired`) is repaired instead of refused, and what was done is appended.

    Raises :class:`InputError` with a one-line message for anything unusable:
    a missing file, a directory, bytes that are not an ONNX model, a missing or
    short external data file, a model the ONNX checker rejects, or an IR/opset
    newer than the installed onnx understands. Models over the protobuf limit
    keep their large tensors on disk (see :mod:`dsrewrite.model_io.external`).
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
    if info.st_size > limits.PROTOBUF_LIMIT:
        raise InputError(
            f"model file {path} is over 2 GiB, more than protobuf can parse (large tensors belong in external data)"
        )
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # DecodeError, RuntimeError, ValueError, ...: whatever protobuf says
        raise InputError(f"not a valid ONNX model: {path} ({first_line(exc) or 'protobuf parse failed'})") from None
    _check_is_model(model, path)
    _check_fields(model, str(path))
    _check_versions(model, str(path))

    external = find_external_tensors(model, path, info.st_size)
    large = external is not None and external.large
    if large and check:
        # The in-memory checker cannot take a model this size; the path-based one reads no tensor data.
        # It runs before any tensor is read, as it always has: its error comes first.
        _checked(lambda: onnx.checker.check_model(str(path)), str(path))
    if external is not None:
        load_external_tensors(model, external)
    if check and not large:
        return _checked_or_repaired(model, str(path), repairs)
    return model


def check_model(model: onnx.ModelProto, *, source: str = "model", repairs: list[str] | None = None) -> onnx.ModelProto:
    """Validate an in-memory model as :func:`load_model` validates a file; InputError on failure.

    The ONNX checker, the IR/opset versions dsrewrite understands, and what the
    checker lets through but breaks tools later (see ``_check_fields``). Returns the
    model, or with ``repairs`` a repaired copy (the caller's model is never modified).
    """
    _check_versions(model, source)
    _check_fields(model, source)
    return _checked_or_repaired(model, source, repairs)


def _checked_or_repaired(model: onnx.ModelProto, source: str, repairs: list[str] | None) -> onnx.ModelProto:
    try:
        run_checker(model)
        return model
    except Exception as exc:  # ValidationError, and assorted C++ errors on garbage
        problem = first_line(exc)
    if repairs is not None:
        fixed, done = repaired(model)
        if done:
            try:
                run_checker(fixed)
            except Exception:  # noqa: BLE001 - not the only defect: refuse it as it was
                pass
            else:
                repairs.append(f"{source} fails the ONNX checker ({problem}); dsrewrite repaired it: {done}")
                return fixed
    raise InputError(f"{source} fails the ONNX checker: {problem}")


def repaired(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` without the checker-only defects onnxruntime accepts, and what was done ("" if nothing).

    A graph output with an element type but no shape (what onnx-graphsurgeon writes for a new output of
    unknown shape) gets its shape from ONNX shape inference; an intermediate ``value_info`` without a
    shape, which is only a hint, is dropped.
    """
    from .external import without_large_tensors  # noqa: PLC0415

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)

    def shapeless(value: onnx.ValueInfoProto) -> bool:
        return value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape")

    done = []
    outputs = [o for o in fixed.graph.output if shapeless(o)]
    if outputs:
        try:
            inferred = onnx.shape_inference.infer_shapes(without_large_tensors(fixed), strict_mode=False)
        except Exception:  # noqa: BLE001 - nothing to fill from
            inferred = None
        known = {o.name: o for o in inferred.graph.output} if inferred is not None else {}
        for output in outputs:
            source = known.get(output.name)
            if source is not None and not shapeless(source):
                output.type.tensor_type.shape.CopyFrom(source.type.tensor_type.shape)
                done.append(f"filled the shape of output '{output.name}' from shape inference")
    hints = [v for v in fixed.graph.value_info if shapeless(v)]
    for value in hints:
        fixed.graph.value_info.remove(value)
    if hints:
        done.append(f"dropped {len(hints)} intermediate value_info without a shape")
    return fixed, "; ".join(done)


def run_checker(model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """``onnx.checker.check_model``, also for models with disk-backed tensors or over 2 GB.

    Such models are checked as :func:`~.external.without_large_tensors` (their
    large tensors' sizes were checked against their shapes when they were
    loaded). Raises what the checker raises.
    """
    if not has_large_initializers(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    # The in-memory checker serialises the model and parses it again: two more copies of every weight.
    skeleton = without_large_tensors(model)
    if serialized_size(skeleton) >= limits.PROTOBUF_LIMIT:
        log.warning("ONNX checker skipped: the model's structure alone is over 2 GB")
        return
    onnx.checker.check_model(skeleton, full_check=full_check)


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
            for sub in node_subgraphs(node):
                visit(sub)

    visit(model.graph)


def _check_is_model(model: onnx.ModelProto, path: Path) -> None:
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"not an ONNX model (no graph or IR version): {path}")
    if not model.opset_import:
        raise InputError(f"not an ONNX model (no opset_import): {path}")


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
            expected, stored = expected_bytes(message), len(message.raw_data)
            if expected is not None and expected != stored:
                raise InputError(
                    f"not a valid ONNX model: {source} (tensor '{message.name}' holds {stored} bytes; "
                    f"its shape {list(message.dims)} needs {expected})"
                )
        for field in descriptor.fields:
            if field.type == field.TYPE_STRING:
                value = getattr(message, field.name)
                if any(isinstance(v, bytes) for v in (value if is_repeated(field) else [value])):
                    raise InputError(f"not a valid ONNX model: {source} (a name or text field is not UTF-8)")
            elif field.type == field.TYPE_MESSAGE:
                if is_repeated(field):
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
        raise InputError(f"{source} fails the ONNX checker: {first_line(exc)}") from None
