"""Tiny models built in code, and helpers to run them in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def conv_model(
    *,
    in_channels: int = 4,
    out_channels: int = 6,
    kernel: tuple[int, ...] = (3, 3),
    spatial: tuple[int | str, ...] | None = None,
    batch: int | str = 1,
    group: int = 1,
    bias: bool = True,
    strides: tuple[int, ...] | None = None,
    pads: tuple[int, ...] | None = None,
    dilations: tuple[int, ...] | None = None,
    auto_pad: str | None = None,
    weight_as_constant_node: bool = False,
    seed: int = 0,
    name: str = "conv",
) -> onnx.ModelProto:
    """One Conv between input 'x' and output 'y'."""
    rng = np.random.default_rng(seed)
    d = len(kernel)
    spatial = spatial or (9,) * d
    weight = rng.standard_normal((out_channels, in_channels // group, *kernel)).astype(np.float32)
    initializers = []
    nodes = []
    if weight_as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], name="W_const", value=numpy_helper.from_array(weight, "W_value")))
    else:
        initializers.append(numpy_helper.from_array(weight, "W"))
    inputs = ["x", "W"]
    if bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "B"))
        inputs.append("B")
    attrs = {"group": group}
    if strides:
        attrs["strides"] = list(strides)
    if pads:
        attrs["pads"] = list(pads)
    if dilations:
        attrs["dilations"] = list(dilations)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    nodes.append(helper.make_node("Conv", inputs, ["y"], name=name, **attrs))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_channels, *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * (d + 2))
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_input(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_same_outputs(original, rewritten, feeds, atol=1e-4, rtol=1e-4):
    expected = run(original, feeds)
    actual = run(rewritten, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        np.testing.assert_allclose(a, e, atol=atol, rtol=rtol)


def dsrewrite_cli(*args):
    """Run the CLI in-process under click's CliRunner; return (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from dsrewrite.cli import main

    with CliRunner().isolation() as (out, err, *_):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, out.getvalue().decode(), err.getvalue().decode()


@pytest.fixture
def tmp_model(tmp_path):
    """Save a model into tmp_path and return its path."""

    def save(model: onnx.ModelProto, name: str = "model.onnx") -> Path:
        path = tmp_path / name
        onnx.save(model, str(path))
        return path

    return save


@pytest.fixture(autouse=True)
def quick_and_private(monkeypatch, tmp_path_factory):
    """Whole-model benchmarks time briefly (they run by default whenever the CLI writes a model), and the
    on-disk caches live in a temporary directory, never in the user's ~/.cache."""
    from dsrewrite import latency

    monkeypatch.setattr(latency, "BENCHMARK_SECONDS", 0.02)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
