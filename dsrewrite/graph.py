"""onnx-graphsurgeon helpers shared by the passes.

* ``producer(t)`` / ``consumers(t)``: graphsurgeon's ``tensor.inputs`` and
  ``tensor.outputs`` read backwards; these names say what they mean.
* ``iter_graphs``: the main graph and every If/Loop/Scan body, recursively.
* ``ConvSpec``: a Conv node with its attributes normalised into a
  :class:`~dsrewrite.geometry.ConvGeometry` and its constant weights, if any.
* ``convs_by_output`` / ``find_conv``: Conv nodes keyed by their output tensor,
  the stable key of every per-conv record (nodes may be unnamed).
* ``with_dense_kernels``: a copy of the model with some convs' kernels (and
  biases) swapped, e.g. for the dense reconstruction of their factors.
* ``NameAllocator``: fresh node/tensor names that collide with nothing in the model.
* ``export_model``: graphsurgeon export that keeps the model-level fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .geometry import ConvGeometry, output_elements
from .model_io.protos import node_subgraphs

Shape = tuple  # of int | None

# The conv-like ops: each gets a plan (the quantized ones only to say why they stay).
CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes ``tensor``, or None for inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read ``tensor``."""
    return list(tensor.outputs)


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and all its subgraphs (If branches, Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            subgraphs = value if isinstance(value, (list, tuple)) else [value]
            for sub in subgraphs:
                if isinstance(sub, gs.Graph):
                    yield from iter_graphs(sub)


def iter_nodes(graph: gs.Graph) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """Every node of the graph and its subgraphs, with the graph that owns it."""
    for g in iter_graphs(graph):
        for node in g.nodes:
            yield g, node


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a ``Constant`` node's output; None if computed at run time.

    Do not write to it. A tensor that graphsurgeon has not loaded yet is read as a read-only view of its bytes:
    loading would copy it (all the model's conv weights, for a run that replaces them anyway) and keep the copy.
    """
    if isinstance(tensor, gs.Constant):
        return _read_only(tensor)
    node = producer(tensor)
    if node is not None and node.op == "Constant":
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return _read_only(value)
    return None


def _read_only(constant: gs.Constant) -> np.ndarray:
    lazy = constant._values  # graphsurgeon keeps the TensorProto until .values is first read
    if type(lazy) is gs.ir.tensor.LazyValues:  # not SparseValues, whose load builds the dense array
        values = np.asarray(numpy_helper.to_array(lazy.tensor))
        if values.flags.writeable:  # a copy (e.g. from typed fields): nothing shares it
            values.flags.writeable = False
        return values
    return np.asarray(constant.values)


def is_graph_output(tensor: gs.Tensor, root: gs.Graph) -> bool:
    return any(tensor in g.outputs for g in iter_graphs(root))


def declared_dims(value: onnx.ValueInfoProto) -> Shape | None:
    """A value's dims as declared (None where symbolic, unknown or not positive); None when it declares no shape."""
    if not (value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim)


def collect_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Tensor name -> shape (None for unknown dims) from a shape-inferred model, subgraphs included."""
    shapes: dict[str, Shape] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            dims = declared_dims(vi)
            if dims is not None:
                shapes.setdefault(vi.name, dims)
        for init in graph.initializer:
            shapes.setdefault(init.name, tuple(init.dims))
        for node in graph.node:
            for sub in node_subgraphs(node):
                visit(sub)

    visit(model.graph)
    return shapes


class NameAllocator:
    """Hands out node and tensor names unique across the whole model."""

    def __init__(self, graph: gs.Graph):
        self._taken: set[str] = set()
        for g in iter_graphs(graph):
            self._taken.update(n.name for n in g.nodes if n.name)
            self._taken.update(g.tensors().keys())

    def fresh(self, base: str) -> str:
        name = base
        counter = 1
        while name in self._taken:
            name = f"{base}_{counter}"
            counter += 1
        self._taken.add(name)
        return name


_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass
class ConvSpec:
    """A Conv node with normalised attributes and, when constant, its weights."""

    node: gs.Node
    graph: gs.Graph
    weight: np.ndarray | None
    bias: np.ndarray | None
    has_bias: bool
    bias_is_constant: bool
    weight_shape: tuple[int, ...] | None
    group: int
    geometry: ConvGeometry | None  # None when the kernel shape is unknown
    input_shape: Shape | None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def kernel_shape(self) -> tuple[int, ...] | None:
        return None if self.weight_shape is None else tuple(self.weight_shape[2:])

    @property
    def kernel_size(self) -> int | None:
        ks = self.kernel_shape
        return None if ks is None else int(np.prod(ks, dtype=np.int64))

    @property
    def out_channels(self) -> int | None:
        return None if self.weight_shape is None else int(self.weight_shape[0])

    @property
    def in_channels(self) -> int | None:
        return None if self.weight_shape is None else int(self.weight_shape[1]) * self.group

    @property
    def output_spatial(self) -> list[int | None] | None:
        if self.input_shape is None or self.geometry is None:
            return None
        return self.geometry.output_spatial(self.input_shape[2:])

    def output_pixels(self) -> int | None:
        """Output positions times batch for one inference; None if any dim is unknown."""
        spatial = self.output_spatial
        if spatial is None:
            return None
        return output_elements(self.input_shape[0], spatial)

    @property
    def is_float(self) -> bool:
        return self.weight is not None and self.weight.dtype in _FLOAT_DTYPES

    @classmethod
    def from_node(cls, node: gs.Node, graph: gs.Graph, shapes: dict[str, Shape]) -> "ConvSpec":
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        weight = constant_value(w)
        bias = constant_value(b) if b is not None else None
        weight_shape = tuple(int(d) for d in weight.shape) if weight is not None else _known(shapes.get(w.name))
        spatial_dims = len(weight_shape) - 2 if weight_shape is not None else None
        attrs = node.attrs
        d = spatial_dims or 0
        pads = tuple(int(p) for p in attrs.get("pads", [0] * (2 * d)))
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        input_shape = shapes.get(x.name)
        if input_shape is None and x.shape is not None:
            input_shape = tuple(s if isinstance(s, int) and s > 0 else None for s in x.shape)
        geometry = None
        if weight_shape is not None:
            geometry = ConvGeometry(
                kernel_shape=tuple(weight_shape[2:]),
                strides=tuple(int(s) for s in attrs.get("strides", [1] * d)),
                pads=pads,
                dilations=tuple(int(s) for s in attrs.get("dilations", [1] * d)),
                auto_pad=auto_pad,
            )
        return cls(
            node=node,
            graph=graph,
            weight=weight,
            bias=bias,
            has_bias=b is not None,
            bias_is_constant=b is None or bias is not None,
            weight_shape=weight_shape,
            group=int(attrs.get("group", 1)),
            geometry=geometry,
            input_shape=input_shape,
        )


def convs_by_output(graph: gs.Graph) -> dict[str, gs.Node]:
    """The graph's Conv nodes keyed by their output tensor name (this graph only, not subgraphs)."""
    return {n.outputs[0].name: n for n in graph.nodes if n.op == "Conv" and n.outputs}


def find_conv(graph: gs.Graph, output: str) -> gs.Node | None:
    """The Conv node of ``graph`` that writes ``output``, or None."""
    return convs_by_output(graph).get(output)


def with_dense_kernels(
    model: onnx.ModelProto, kernels: Mapping[str, tuple[np.ndarray, np.ndarray | None]], *, label: str = "dense"
) -> onnx.ModelProto:
    """A copy of ``model`` whose convs (keyed by output) compute with new dense kernels.

    ``kernels[output] = (W, b)``: ``W`` replaces the kernel, cast to its dtype; ``b``
    replaces the bias, or ``None`` keeps the conv's own bias input. A dense conv with the
    reconstruction of separable factors computes what their rewrite would, with no surgery.
    """
    graph = gs.import_onnx(model)
    names = NameAllocator(graph)
    nodes = convs_by_output(graph)
    for output, (kernel, bias) in kernels.items():
        node = nodes[output]
        dtype = constant_value(node.inputs[1]).dtype
        weight = gs.Constant(names.fresh(f"{output}/{label}_W"), np.asarray(kernel).astype(dtype))
        if bias is None:
            node.inputs = [node.inputs[0], weight, *node.inputs[2:]]
        else:
            node.inputs = [node.inputs[0], weight, gs.Constant(names.fresh(f"{output}/{label}_B"), np.asarray(bias).astype(dtype))]
    graph.cleanup(remove_unused_graph_inputs=False)
    return export_model(graph, model)


def export_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` and restore the model-level fields of ``original``."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = original.ir_version
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    model.producer_name = original.producer_name
    model.producer_version = original.producer_version
    model.domain = original.domain
    model.model_version = original.model_version
    model.doc_string = original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    if not model.functions and original.functions:
        model.functions.extend(original.functions)
    if model.ir_version < 4:
        _list_initializers_as_inputs(model.graph)
    return model


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR < 4 requires every initializer to be a graph input too."""
    listed = {vi.name for vi in graph.input}
    for init in graph.initializer:
        if init.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


def _known(shape: Shape | None) -> tuple[int, ...] | None:
    if shape is None or any(s is None for s in shape):
        return None
    return tuple(int(s) for s in shape)

