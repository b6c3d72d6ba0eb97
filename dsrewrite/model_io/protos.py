"""Helpers over onnx's protobuf messages, shared by the model_io modules.

Walking every tensor of a model, copying a model without copying its tensor
data, tensor sizes from shapes (never from the data), and the one line of an
onnx or protobuf error worth showing the user.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx

from . import limits

_SUB_BYTE_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: main-graph initializers, then those of subgraphs, attributes and functions."""
    yield from model.graph.initializer
    yield from nested_tensors(model)


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node's attributes hold (If branches, Loop and Scan bodies)."""
    return [graph for attr in node.attribute for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def nested_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The tensors that are not main-graph initializers: subgraph initializers, attribute values."""

    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
            for sub in node_subgraphs(node):
                yield from sub.initializer
                yield from in_nodes(sub.node)

    yield from in_nodes(model.graph.node)
    for function in model.functions:
        yield from in_nodes(function.node)


def external_location(tensor: onnx.TensorProto) -> str:
    """The ``location`` entry of an external tensor ("" if it has none)."""
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def itemsize(tensor: onnx.TensorProto) -> int | None:
    """Bytes per element, or None for strings, sub-byte and unknown types."""
    if tensor.data_type in _SUB_BYTE_TYPES or tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # noqa: BLE001 - an unknown enum value
        return None


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    size = itemsize(tensor)
    return None if size is None else math.prod(tensor.dims) * size


def data_bytes(tensor: onnx.TensorProto) -> int:
    """Size of the tensor's data, from its shape (no copy of the data is made)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        with contextlib.suppress(KeyError, ValueError):
            return int(entries["length"])
    size = itemsize(tensor)
    return math.prod(tensor.dims) * (size or 1)


def serialized_size(message) -> int:
    """ByteSize, or PROTOBUF_LIMIT when protobuf cannot even size it (over 2 GiB)."""
    try:
        return message.ByteSize()
    except Exception:  # noqa: BLE001 - EncodeError past the limit
        return limits.PROTOBUF_LIMIT


def serialized_below(model: onnx.ModelProto, limit: int, *, deterministic: bool = False) -> bytes | None:
    """The model's bytes if they number fewer than ``limit``, else None.

    One serialisation and no ByteSize first: upb's ByteSize costs about as much as serialising (0.09 s each for a
    59 MB VGG16). A model whose in-memory tensor data alone reaches ``limit`` is not serialised at all, so a large
    model is never copied just to learn that it is large.
    """
    inline = sum(data_bytes(t) for t in all_tensors(model) if t.data_location != onnx.TensorProto.EXTERNAL)
    if inline >= limit:
        return None
    try:
        data = model.SerializeToString(deterministic=deterministic)
    except Exception:  # noqa: BLE001 - EncodeError past 2 GiB
        return None
    return data if len(data) < limit else None


def is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29; `label` is gone in 7
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def copy_fields(src, dst, *, skip: Iterable[str] = ()) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except ``skip``."""
    skip = set(skip)
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if is_repeated(field):
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def copy_model(
    src: onnx.ModelProto,
    dst: onnx.ModelProto,
    initializer: Callable[[onnx.TensorProto, onnx.GraphProto, int], None],
) -> None:
    """Copy ``src`` into ``dst``, handing each initializer (of every graph) to ``initializer(tensor, graph, depth)``.

    Nothing else is copied through it, so large tensors are never duplicated
    unless the callback copies them.
    """
    copy_fields(src, dst, skip=("graph",))
    if src.HasField("graph"):
        _copy_graph(src.graph, dst.graph, initializer, 0)


def _copy_graph(src: onnx.GraphProto, dst: onnx.GraphProto, initializer, depth: int) -> None:
    copy_fields(src, dst, skip=("initializer", "node"))
    for tensor in src.initializer:
        initializer(tensor, dst, depth)
    for node in src.node:
        new = dst.node.add()
        copy_fields(node, new, skip=("attribute",))
        for attr in node.attribute:
            copy = new.attribute.add()
            if attr.HasField("g") or len(attr.graphs):
                copy_fields(attr, copy, skip=("g", "graphs"))
                if attr.HasField("g"):
                    _copy_graph(attr.g, copy.g, initializer, depth + 1)
                for sub in attr.graphs:
                    _copy_graph(sub, copy.graphs.add(), initializer, depth + 1)
            else:
                copy.CopyFrom(attr)


def first_line(exc: BaseException) -> str:
    """The first line of an error that says something (not one of the onnx checker's ``==> Context`` lines)."""
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("==>"):
            return line[:300]
    return type(exc).__name__
