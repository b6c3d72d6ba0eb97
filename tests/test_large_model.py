"""Models over the 2 GB protobuf limit: tensors left on disk, checker, onnxruntime and saving.

The fast tests lower model_io's thresholds so a few-hundred-kilobyte model takes
the same code path as a > 2 GiB one. The slow test builds a real 2.06 GiB model
(its data file is written in chunks, never held in memory) and measures the
peak memory of a ``dsrewrite`` subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import dsrewrite_cli
from onnx import TensorProto, helper, numpy_helper

import dsrewrite
from dsrewrite.model_io import (
    is_disk_backed,
    load_model,
    onnxruntime_source,
    run_checker,
    save_model,
)
from dsrewrite.model_io import external, limits


def big_model(directory: Path, *, rows: int, dim: int = 1024, name: str = "big.onnx") -> Path:
    """Two convs (3×3, then 1×1) on input ``x`` and a ``rows × dim`` float table gathered by ``idx``.

    The table and the conv weights live in ``<name>.data``; the table is written
    in 16 MiB chunks, so building a multi-gigabyte model never holds it in
    memory. Row r, column c of the table holds ``r·1e-3 + c·1e-6``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    data_name = name + ".data"
    rng = np.random.default_rng(0)
    weights = {
        "W1": rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        "W2": rng.standard_normal((8, 32, 1, 1)).astype(np.float32),
    }
    initializers = [numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "B1")]

    def external(name, dims, offset, length):
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    chunk = max(1, (16 * 2**20) // (4 * dim))
    with open(directory / data_name, "wb") as fh:
        columns = np.arange(dim, dtype=np.float32) * np.float32(1e-6)
        for start in range(0, rows, chunk):
            block = np.arange(start, min(rows, start + chunk), dtype=np.float32)[:, None] * np.float32(1e-3) + columns
            fh.write(block.astype(np.float32).tobytes())
        initializers.append(external("table", [rows, dim], 0, rows * dim * 4))
        for key, array in weights.items():
            initializers.append(external(key, list(array.shape), fh.tell(), array.nbytes))
            fh.write(array.tobytes())
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Conv", ["hr", "W2"], ["y"], name="conv2"),
        helper.make_node("Gather", ["table", "idx"], ["z"], name="gather", axis=0),
    ]
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 12, 12]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, dim])],
        initializer=initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    path = directory / name
    onnx.save_model(model, str(path))  # every large tensor is already external: this file is tiny
    return path


def run_path(path: Path, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def feeds(rows: int) -> dict:
    x = np.random.default_rng(3).standard_normal((1, 16, 12, 12)).astype(np.float32)
    return {"x": x, "idx": np.array([0, 7, rows - 1], dtype=np.int64)}


def snapshot(directory: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.fixture
def tiny_limits(monkeypatch):
    """Make a ~400 kB model count as 'over the protobuf limit'."""
    monkeypatch.setattr(limits, "PROTOBUF_LIMIT", 200_000)
    monkeypatch.setattr(limits, "EXTERNAL_DATA_THRESHOLD", 150_000)
    monkeypatch.setattr(limits, "DISK_BACKED_MIN_BYTES", 4096)


def cli(*args) -> tuple[int, str]:
    code, _out, err = dsrewrite_cli(*args)
    return code, err


def test_over_the_limit_the_table_stays_on_disk_and_the_cli_streams_it(tmp_path, tiny_limits):
    rows = 100  # 400 kB table
    model_path = big_model(tmp_path / "in", rows=rows)
    before = snapshot(tmp_path / "in")
    loaded = load_model(model_path)
    disk = {t.name: is_disk_backed(t) for t in loaded.graph.initializer}
    assert disk == {"W1": False, "B1": False, "W2": False, "table": True}, "conv weights are read, so loaded"
    run_checker(loaded, full_check=True)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = cli(model_path, "-o", out_dir / "slim.onnx", "--rank", "full", "--report", out_dir / "r.json")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["r.json", "slim.onnx", "slim.onnx.data"]
    assert snapshot(tmp_path / "in") == before, "input untouched"
    report = json.loads((out_dir / "r.json").read_text())
    assert report["verification"]["passed"] and {o["name"] for o in report["verification"]["outputs"]} == {"y", "z"}

    onnx.checker.check_model(str(out_dir / "slim.onnx"), full_check=True)  # path form: external data checked
    slim = onnx.load(str(out_dir / "slim.onnx"), load_external_data=False)
    table = next(t for t in slim.graph.initializer if t.name == "table")
    assert {e.key: e.value for e in table.external_data}["location"] == "slim.onnx.data"
    offset = int({e.key: e.value for e in table.external_data}["offset"])
    assert offset % limits.LARGE_TENSOR_ALIGNMENT == 0
    expected, actual = run_path(model_path, feeds(rows)), run_path(out_dir / "slim.onnx", feeds(rows))
    np.testing.assert_array_equal(actual[1], expected[1])
    np.testing.assert_allclose(actual[0], expected[0], atol=1e-4 * np.abs(expected[0]).max(), rtol=1e-3)


def test_overwriting_a_disk_backed_input_repoints_its_tensors(tmp_path, tiny_limits):
    rows = 100
    model_path = big_model(tmp_path, rows=rows)
    expected = run_path(model_path, feeds(rows))
    result = dsrewrite.rewrite(model_path, rank="full", verify=False)
    # The output's data file is the input's own data file: it is read while the new one is written.
    assert save_model(result.model, model_path) == [model_path, tmp_path / "big.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    actual = run_path(model_path, feeds(rows))
    np.testing.assert_array_equal(actual[1], expected[1])
    # The in-memory result still reads correct bytes: its disk-backed table now points into the new file.
    with onnxruntime_source(result.model) as (source, config):
        options = ort.SessionOptions()
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        again = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds(rows))
    np.testing.assert_array_equal(again[1], expected[1])


def test_an_in_memory_model_over_the_limit_goes_to_onnxruntime_through_a_temp_dir(tmp_path, monkeypatch):
    model_path = big_model(tmp_path, rows=100)
    model = load_model(model_path)  # fully in memory at the real limits
    monkeypatch.setattr(limits, "PROTOBUF_LIMIT", 100_000)
    with onnxruntime_source(model) as (source, config):
        assert isinstance(source, str) and config == {}
        temp_dir = Path(source).parent
        assert sorted(p.name for p in temp_dir.iterdir()) == ["model.onnx", "model.onnx.data"]
        outputs = ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds(100))
    assert not temp_dir.exists()
    np.testing.assert_array_equal(outputs[1], run_path(model_path, feeds(100))[1])
    run_checker(model)  # over the (patched) limit: checked without the big tensors' data


def test_a_short_data_file_is_an_input_error(tmp_path, tiny_limits):
    model_path = big_model(tmp_path, rows=100)
    with open(tmp_path / "big.onnx.data", "r+b") as fh:
        fh.truncate(100 * 1024 * 4 - 8)
    code, err = cli(model_path, "-o", tmp_path / "out.onnx")
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "external data" in err and not (tmp_path / "out.onnx").exists()


@pytest.mark.slow
def test_a_model_over_2_gib_is_rewritten_verified_and_saved_within_2_5x_its_size(tmp_path):
    rows = 2**19 + 2**14  # 540672 rows × 4 KiB = 2.0625 GiB of table
    start = time.perf_counter()
    model_path = big_model(tmp_path / "in", rows=rows)
    built = time.perf_counter() - start
    size = model_path.stat().st_size + (tmp_path / "in" / "big.onnx.data").stat().st_size
    assert size > 2**31
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # A wrapper process whose only child is dsrewrite: RUSAGE_CHILDREN then measures just that run.
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(p.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(p.stderr)\n"
    )
    command = [sys.executable, "-m", "dsrewrite", str(model_path), "-o", str(out_dir / "slim.onnx"),
               "--rank", "full", "--report", str(out_dir / "r.json"), "-v"]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, timeout=900)
    code, seconds, max_rss_kb = done.stdout.split()
    peak = int(max_rss_kb) * 1024
    print(f"\nmodel {size / 2**30:.3f} GiB (built in {built:.1f}s); dsrewrite {float(seconds):.1f}s, "
          f"peak RSS {peak / 2**20:.0f} MiB = {peak / size:.3f}x the model")  # fmt: skip
    assert code == "0", done.stderr
    assert "stay on disk" in done.stderr
    assert peak < 2.5 * size
    assert sorted(p.name for p in out_dir.iterdir()) == ["r.json", "slim.onnx", "slim.onnx.data"]
    report = json.loads((out_dir / "r.json").read_text())
    assert report["verification"]["passed"]

    onnx.checker.check_model(str(out_dir / "slim.onnx"))
    reloaded = load_model(out_dir / "slim.onnx")  # over the limit again: the table stays on disk
    assert any(is_disk_backed(t) for t in reloaded.graph.initializer)
    expected, actual = run_path(model_path, feeds(rows)), run_path(out_dir / "slim.onnx", feeds(rows))
    np.testing.assert_array_equal(actual[1], expected[1])
    np.testing.assert_allclose(actual[0], expected[0], atol=1e-4 * np.abs(expected[0]).max(), rtol=1e-3)
    os.unlink(tmp_path / "in" / "big.onnx.data")  # do not leave 4 GB in pytest's temp dirs
    os.unlink(out_dir / "slim.onnx.data")


def test_shape_inference_and_the_checker_see_large_tensors_as_typed_inputs(tmp_path):
    from dsrewrite.graph import collect_shapes
    from dsrewrite.model_io import without_large_tensors
    from dsrewrite.pipeline import infer_shapes

    model = load_model(big_model(tmp_path, rows=300))  # everything in memory; the table is 1.2 MB
    skeleton = without_large_tensors(model)
    assert [t.name for t in skeleton.graph.initializer] == ["B1", "W1", "W2"]
    assert "table" in {vi.name for vi in skeleton.graph.input}
    assert skeleton.ByteSize() < 100_000 < model.ByteSize()
    shapes = collect_shapes(infer_shapes(model))
    assert shapes["table"] == (300, 1024) and shapes["h"] == (1, 32, 12, 12) and shapes["z"] == (3, 1024)
    run_checker(skeleton, full_check=True)


def test_a_large_in_memory_model_is_verified_through_a_file(tmp_path, monkeypatch):
    """From a file onnxruntime maps the weights (about 1x the model) instead of copying bytes (about 3.4x)."""
    model = load_model(big_model(tmp_path, rows=64))
    monkeypatch.setattr(limits, "ORT_VIA_FILE_BYTES", 10_000)
    seen = []
    real = external.save_model
    # onnxruntime_source calls save_model from its own module.
    monkeypatch.setattr(external, "save_model", lambda m, p, **k: seen.append(Path(p).parent) or real(m, p, **k))
    result = dsrewrite.rewrite(model, rank="full")
    assert result.ok and result.report.verification.passed
    assert len(seen) == 2 and not any(d.exists() for d in seen), "one temp dir per session, removed"
