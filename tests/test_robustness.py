"""Robustness and safety of the command line (issue #7).

Contract for bad input: exit code 2, exactly one ``error:`` line on stderr, no
traceback, nothing written (no model, no report, no temp file in the output
directory) and the input untouched (same bytes, same mtime). Interrupts leave no
partial file. The same input and options give a byte-identical model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, conv_model, dsrewrite_cli, random_input, run
from onnx import TensorProto, helper, numpy_helper

from dsrewrite import model_io
from dsrewrite.model_io import external, limits

ROOT = Path(__file__).resolve().parents[1]


def tree(directory: Path) -> dict:
    """Every entry under ``directory``: content hash (or link target) and mtime, without following links."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            content = "link:" + os.readlink(path)
        elif path.is_file():
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = "dir"
        entries[str(path.relative_to(directory))] = (content, info.st_mtime_ns)
    return entries


def assert_clean_failure(code, out, err, *, message=None, exit_code=2):
    assert code == exit_code, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    if message is not None:
        assert message in err, err


def two_conv_model(*, nan_in: str | None = None) -> onnx.ModelProto:
    """x [1,4,9,9] -> conv1 (3×3, 4->6) -> y1 and x -> conv2 (3×3, 4->5, bias) -> y2.

    ``nan_in="conv1"`` puts a NaN in conv1's weight, ``"conv2"`` an Inf in conv2's bias.
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    b2 = rng.standard_normal(5).astype(np.float32)
    if nan_in == "conv1":
        w1[2, 1, 0, 0] = np.nan
    elif nan_in == "conv2":
        b2[3] = np.inf
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["y1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "W2", "B2"], ["y2"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 6, 9, 9]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 5, 7, 7])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b2, "B2")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    return model


class Workspace:
    """``in/model.onnx`` (a valid 3×3 conv) and an empty ``out/``; checks nothing changed after a failure."""

    def __init__(self, root: Path):
        self.inputs = root / "in"
        self.outputs = root / "out"
        self.inputs.mkdir()
        self.outputs.mkdir()
        self.model = self.inputs / "model.onnx"
        onnx.save(conv_model(in_channels=4, out_channels=8), str(self.model))
        self.snapshot()

    def snapshot(self):
        self.before = tree(self.inputs)

    def assert_untouched(self):
        assert tree(self.inputs) == self.before, "the input directory changed"
        assert tree(self.outputs) == {}, f"files left in the output directory: {sorted(tree(self.outputs))}"

    def fails(self, *args, message=None, model=None):
        model = self.model if model is None else model
        code, out, err = dsrewrite_cli(model, *args)
        assert_clean_failure(code, out, err, message=message)
        self.assert_untouched()
        return err


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path)


# -- unusable model files -----------------------------------------------------------------------


def _external(ws, *, data_name="weights.bin", mutate=None):
    model = conv_model(in_channels=8, out_channels=8)
    path = ws.inputs / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location=data_name, size_threshold=0)
    if mutate:
        mutate(path, ws.inputs / data_name)
    return path


def _with_model(ws, name, change):
    model = conv_model(in_channels=4, out_channels=8)
    change(model)
    path = ws.inputs / name
    path.write_bytes(model.SerializeToString())
    return path


def _fifo(ws):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this platform")
    path = ws.inputs / "pipe.onnx"
    os.mkfifo(path)
    return path


def _unknown_op(model):
    model.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"], name="mystery"))
    model.graph.output[0].name = "z"


def _undefined_edge(model):
    model.graph.node[0].input[0] = "never_defined"


def _duplicate_output(model):
    model.graph.node.append(helper.make_node("Relu", ["x"], ["y"], name="second_writer"))


def _ir_too_new(model):
    model.ir_version = onnx.IR_VERSION + 1


def _opset_too_new(model):
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1


MODEL_FILES = {
    "missing": (lambda ws: ws.inputs / "absent.onnx", "not found"),
    "directory": (lambda ws: ws.inputs, "directory"),
    "named pipe": (_fifo, "not a regular file"),
    "empty": (lambda ws: _write(ws, "empty.onnx", b""), "empty"),
    "random bytes": (lambda ws: _write(ws, "random.onnx", np.random.default_rng(7).bytes(5000)), "ONNX model"),
    "truncated": (lambda ws: _write(ws, "cut.onnx", ws.model.read_bytes()[: ws.model.stat().st_size // 2]), "ONNX model"),
    "TensorProto": (
        lambda ws: _write(ws, "t.onnx", numpy_helper.from_array(np.ones((2, 3), np.float32), "t").SerializeToString()),
        "ONNX model",
    ),
    "GraphProto": (lambda ws: _write(ws, "g.onnx", conv_model().graph.SerializeToString()), "ONNX model"),
    "text file": (lambda ws: _write(ws, "notes.onnx", b"ir_version: 8\nthis is a text file\n" * 10), "ONNX model"),
    "external data missing": (lambda ws: _external(ws, mutate=lambda m, d: d.unlink()), "external data"),
    "external data short": (
        lambda ws: _external(ws, mutate=lambda m, d: os.truncate(d, d.stat().st_size // 2)),
        "external data",
    ),
    "external data outside the model's dir": (
        lambda ws: _external(ws, data_name="weights.bin", mutate=_point_outside),
        "external data",
    ),
    "unknown op": (lambda ws: _with_model(ws, "op.onnx", _unknown_op), "checker"),
    "undefined edge": (lambda ws: _with_model(ws, "edge.onnx", _undefined_edge), "checker"),
    "tensor written twice": (lambda ws: _with_model(ws, "ssa.onnx", _duplicate_output), "checker"),
    "IR version too new": (lambda ws: _with_model(ws, "ir.onnx", _ir_too_new), "IR version"),
    "opset too new": (lambda ws: _with_model(ws, "opset.onnx", _opset_too_new), "opset"),
}


def _write(ws, name, data):
    path = ws.inputs / name
    path.write_bytes(data)
    return path


def _point_outside(model_path, data_path):
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../" + data_path.name
    model_path.write_bytes(model.SerializeToString())
    shutil.copy(data_path, data_path.parent.parent / data_path.name)


@pytest.mark.parametrize("case", list(MODEL_FILES))
def test_unusable_model_files(ws, case):
    make, message = MODEL_FILES[case]
    model = make(ws)
    ws.snapshot()
    ws.fails("-o", ws.outputs / "slim.onnx", "--report", ws.outputs / "r.json", model=model, message=message)


# -- output paths -------------------------------------------------------------------------------


def test_output_paths(ws):
    ws.fails("-o", ws.outputs / "missing" / "slim.onnx", message="does not exist")
    ws.fails("-o", ws.model / "slim.onnx", message="not a directory")
    ws.fails("-o", ws.outputs, message="is a directory")
    ws.fails("-o", ws.model, message="--overwrite")
    ws.fails("-o", ws.inputs / ".." / "in" / "model.onnx", message="--overwrite")
    ws.fails("-o", ws.outputs / "slim.onnx", "--report", ws.model / "r.json", message="not a directory")
    ws.fails("-o", ws.outputs / "slim.onnx", "--report", ws.outputs / "nowhere" / "r.json", message="does not exist")
    ws.fails("-o", ws.outputs / "both.json", "--report", ws.outputs / "both.json", message="output model")


def test_output_through_a_symlink_to_the_input_is_refused(ws):
    link = ws.inputs / "link.onnx"
    link.symlink_to(ws.model)
    ws.snapshot()
    ws.fails("-o", link, message="--overwrite")


def test_output_may_not_replace_the_inputs_external_data(ws):
    model = _external(ws)
    ws.snapshot()
    ws.fails("-o", ws.inputs / "weights.bin", model=model, message="external data file of the input")


# -- options ------------------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--rank", "-1"], "rank"),
    (["--rank", "2x"], "rank"),
    (["--rank", "1.5"], "rank"),
    (["--rank", ""], "rank"),
    (["--max-error", "-0.5"], "max-error"),
    (["--max-error", "0"], "max-error"),
    (["--max-error", "nan"], "max-error"),
    (["--atol", "nan"], "atol"),
    (["--rtol", "-1e-3"], "rtol"),
    (["--input-shape", "x:"], "input-shape"),
    (["--input-shape", "x:1,4,0,9"], "input-shape"),
    (["--input-shape", ":1,4,9,9"], "input-shape"),
    (["--input-shape", "x:1;4;9;9"], "input-shape"),
    (["--input-shape", "y:1,4,9,9"], "unknown input"),
    (["--input-shape", "x:1,4,9"], "rank"),
    (["--calibration-samples", "0"], "calibration-samples"),
    (["--seed", "zero"], "seed"),
]


@pytest.mark.parametrize("args,message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options(ws, args, message):
    ws.fails("-o", ws.outputs / "slim.onnx", "--report", ws.outputs / "r.json", *args, message=message)


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "inf", "half"])
def test_target_macs_outside_0_1(ws, value):
    code, help_text, _ = dsrewrite_cli("--help")
    if "--target-macs" not in help_text:
        pytest.skip("this CLI has no --target-macs")
    ws.fails("-o", ws.outputs / "slim.onnx", "--target-macs", value, message="target-macs")


# -- calibration data ---------------------------------------------------------------------------


def _npz(ws, name="calib.npz", **arrays):
    path = ws.inputs / name
    np.savez(path, **arrays)
    return path


def _samples(n=3, shape=(1, 4, 9, 9), dtype=np.float32):
    return np.random.default_rng(0).standard_normal((n, *shape)).astype(dtype)


def _bad_directory(ws):
    directory = ws.inputs / "feeds"
    directory.mkdir()
    np.savez(directory / "a.npz", x=_samples(1)[0])
    np.savez(directory / "b.npz", x=_samples(1)[0].astype(np.int16))
    return directory


CALIBRATION = {
    "missing": (lambda ws: ws.inputs / "absent.npz", "not found"),
    "garbage": (lambda ws: _write(ws, "garbage.npz", b"\x00\x01garbage" * 100), "not an .npz"),
    "text": (lambda ws: _write(ws, "text.npz", b"x = 1, 2, 3\n"), "not an .npz"),
    "a .npy array": (lambda ws: _npy(ws), "not an .npz"),
    "no arrays": (lambda ws: _npz(ws), "lacks model input 'x'"),
    "unknown input": (lambda ws: _npz(ws, x=_samples(), extra=_samples()), "unknown input 'extra'"),
    "only an unknown input": (lambda ws: _npz(ws, images=_samples()), "unknown input 'images'"),
    "wrong rank": (lambda ws: _npz(ws, x=_samples(shape=(4, 9))), "rank"),
    "wrong shape": (lambda ws: _npz(ws, x=_samples(shape=(1, 3, 9, 9))), "shape"),
    "float64 too large for float32": (lambda ws: _npz(ws, x=_samples(dtype=np.float64) * 1e300), "too large"),
    "integer dtype": (lambda ws: _npz(ws, x=_samples().astype(np.int32)), "dtype int32"),
    "NaN values": (lambda ws: _npz(ws, x=np.where(_samples() > 2, np.nan, _samples())), "NaN"),
    "zero samples": (lambda ws: _npz(ws, x=_samples(0)), "no samples"),
    "empty directory": (lambda ws: _mkdir(ws, "empty_feeds"), "no .npz"),
    "directory with a bad file": (_bad_directory, "dtype int16"),
}


def _npy(ws):
    path = ws.inputs / "calib.npz"
    with open(path, "wb") as fh:
        np.save(fh, _samples())
    return path


def _mkdir(ws, name):
    path = ws.inputs / name
    path.mkdir()
    return path


@pytest.mark.parametrize("case", list(CALIBRATION))
def test_bad_calibration_data(ws, case):
    make, message = CALIBRATION[case]
    data = make(ws)
    ws.snapshot()
    ws.fails("-o", ws.outputs / "slim.onnx", "--report", ws.outputs / "r.json", "--rank", "1",
             "--calibration", data, message=message)  # fmt: skip


# -- the same through a real process: nothing but one line leaks ----------------------------------


def test_bad_input_through_python_m_dsrewrite(tmp_path):
    ws = Workspace(tmp_path)
    garbage = _write(ws, "garbage.onnx", np.random.default_rng(1).bytes(3000))
    unknown = _with_model(ws, "op.onnx", _unknown_op)
    no_data = _external(ws, mutate=lambda m, d: d.unlink())
    calib = _npz(ws, x=_samples().astype(np.int32))
    ws.snapshot()
    out = ws.outputs / "slim.onnx"
    cases = [
        ([garbage, "-o", out], "ONNX model"),
        ([unknown, "-o", out], "checker"),
        ([no_data, "-o", out], "external data"),
        ([ws.model, "-o", out, "--rank", "-2"], "rank"),
        ([ws.model, "-o", ws.model], "--overwrite"),
        ([ws.model, "-o", out, "--calibration", calib, "--rank", "1"], "dtype"),
        ([ws.model, "-o", out, "--input-shape", "x:1,4,99999999999,9"], None),  # too large to allocate
        ([ws.model, "-o", out, "--input-shape", "x:1,5,9,9"], "onnxruntime"),  # onnxruntime logs nothing itself
    ]
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # show every warning: none may reach stderr
    procs = [
        (subprocess.Popen([sys.executable, "-m", "dsrewrite", *map(str, args)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), message)  # fmt: skip
        for args, message in cases
    ]
    for proc, message in procs:
        out_text, err_text = proc.communicate(timeout=120)
        assert_clean_failure(proc.returncode, out_text, err_text, message=message)
    ws.assert_untouched()


# -- cases that must succeed --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["conv1", "conv2"])
def test_nan_or_inf_parameters_skip_that_layer_only(tmp_path, where):
    model = two_conv_model(nan_in=where)
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    code, out, err = dsrewrite_cli(path, "-o", tmp_path / "out.onnx", "--rank", "full", "--report", tmp_path / "r.json")
    assert code == 0, err
    layers = {layer["node"]: layer for layer in json.loads((tmp_path / "r.json").read_text())["layers"]}
    other = "conv2" if where == "conv1" else "conv1"
    assert layers[where]["status"] == "skipped" and "NaN or Inf" in layers[where]["reason"]
    assert layers[other]["status"] == "rewritten"
    slim = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(slim, full_check=True)
    assert where in {n.name for n in slim.graph.node} and other not in {n.name for n in slim.graph.node}
    x = random_input((1, 4, 9, 9))
    for expected, actual in zip(run(model, {"x": x}), run(slim, {"x": x})):
        np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected))  # NaN/Inf exactly where they were
        finite = np.isfinite(expected)
        scale = np.abs(expected[finite]).max()
        np.testing.assert_allclose(actual[finite], expected[finite], atol=1e-4 * scale, rtol=1e-3)


def test_a_model_without_convs_is_written_with_the_same_graph(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    scale = numpy_helper.from_array(np.full((2, 3), 0.5, np.float32), "scale")
    nodes = [helper.make_node("Mul", ["x", "scale"], ["m"], name="mul"), helper.make_node("Relu", ["m"], ["y"], name="relu")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [scale]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "plain.onnx"
    onnx.save(model, str(path))
    code, out, err = dsrewrite_cli(path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert code == 0, err
    written = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(written, full_check=True)
    assert written.graph == model.graph
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layers"] == [] and any("nothing to rewrite" in note for note in report["notes"])


def test_value_info_that_repeats_an_output_without_its_shape_is_dropped(tmp_path):
    """An exporter listed the graph output in value_info too, with no shape (ddddocr's quantized CRNN): the graph
    editor took the empty shape for the output, and the rewritten graph failed the ONNX checker."""
    model = conv_model(in_channels=4, out_channels=6, pads=(1, 1, 1, 1))
    model.graph.value_info.append(helper.make_empty_tensor_value_info("y"))
    model.graph.value_info[-1].type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(model, full_check=True)  # the input is valid as it is
    path = tmp_path / "listed.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    code, out, err = dsrewrite_cli(path, "-o", tmp_path / "out.onnx", "--rank", "1")
    assert code == 0, err
    written = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(written, full_check=True)
    assert len(written.graph.output[0].type.tensor_type.shape.dim) == 4  # the output's own (rank-4) shape
    assert "y" not in {value.name for value in written.graph.value_info}
    assert path.read_bytes() == before


def test_a_small_model_with_external_data_is_written_as_one_file(tmp_path):
    model = conv_model(in_channels=8, out_channels=8)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.weights", size_threshold=0)
    code, out, err = dsrewrite_cli(path, "-o", tmp_path / "out.onnx", "--rank", "full")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.weights", "out.onnx"]
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


# -- interrupts -----------------------------------------------------------------------------------


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_sigint_and_sigterm_mid_run_leave_nothing_behind(tmp_path):
    calibration = tmp_path / "calib.npz"
    # Enough samples that the fit lasts seconds even on a fast machine; the run is interrupted long before.
    np.savez(calibration, input=np.random.default_rng(0).random((128, 1, 3, 64, 64)).astype(np.float32))
    runs = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        out_dir = tmp_path / f"out_{signum}"
        out_dir.mkdir()
        command = [sys.executable, "-m", "dsrewrite", str(SAMPLES / "vgg_small.onnx"), "-o", str(out_dir / "slim.onnx"),
                   "--rank", "2", "--calibration", str(calibration), "--report", str(out_dir / "r.json"), "-v"]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[signum] = (proc, out_dir, [])
    for signum, (proc, out_dir, lines) in runs.items():
        # The plan-only decompose_conv logs just before the calibration fit starts; interrupt inside the fit.
        for line in proc.stderr:
            lines.append(line)
            if "decompose_conv:" in line or "dsrewrite.distill" in line:
                break
        time.sleep(0.3)
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signum)
    for signum, (proc, out_dir, lines) in runs.items():
        out_text, rest = proc.communicate(timeout=60)
        err = "".join(lines) + rest
        assert proc.returncode == 128 + signum, err
        assert err.splitlines()[-1] == "error: interrupted", err
        assert "Traceback" not in err + out_text
        assert _leftovers(out_dir) == [], "no model, data, report or temp file"


def test_an_interrupt_while_saving_leaves_no_partial_files(ws, monkeypatch):
    monkeypatch.setattr(limits, "EXTERNAL_DATA_THRESHOLD", 100)  # take the external-data path
    monkeypatch.setattr(limits, "INLINE_MAX_BYTES", 16)
    written = []

    def interrupted_after_first_tensor(tensor, *args):
        written.append(tensor.name)
        if len(written) == 2:
            raise KeyboardInterrupt
        return original(tensor, *args)

    original = external._set_location
    monkeypatch.setattr(external, "_set_location", interrupted_after_first_tensor)
    code, out, err = dsrewrite_cli(ws.model, "-o", ws.outputs / "slim.onnx", "--rank", "1")
    assert code == 130 and err.splitlines() == ["error: interrupted"], err
    assert _leftovers(ws.outputs) == []


def test_an_interrupt_between_the_two_renames_is_held_until_both_are_done(ws, monkeypatch):
    monkeypatch.setattr(limits, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(limits, "INLINE_MAX_BYTES", 16)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C right after the data file went into place
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)  # the one os module: model_io looks it up at each call
    code, out, err = dsrewrite_cli(ws.model, "-o", ws.outputs / "slim.onnx", "--rank", "1")
    assert calls == ["slim.onnx.data", "slim.onnx"]
    assert code == 130 and err.splitlines() == ["error: interrupted"], err
    # Both files made it, consistent with each other; no temp directory is left.
    assert _leftovers(ws.outputs) == ["slim.onnx", "slim.onnx.data"]
    x = random_input((1, 4, 9, 9))
    slim = model_io.load_model(ws.outputs / "slim.onnx")
    assert run(slim, {"x": x})[0].shape == run(onnx.load(str(ws.model)), {"x": x})[0].shape


# -- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sample,rank", [("vgg_small", "1"), ("resnet_bn", "auto"), ("grouped_depthwise", "2")])
def test_the_same_run_gives_the_same_bytes(tmp_path, sample, rank):
    outputs = []
    for i in range(2):
        out = tmp_path / f"{i}.onnx"
        # Untimed: a latency-aware decision (the default for --rank auto) follows the machine's load from run to
        # run; a saved plan (--plan) is what reproduces a timed one.
        code, _, err = dsrewrite_cli(SAMPLES / f"{sample}.onnx", "-o", out, "--rank", rank, "-q", "--no-latency-aware")
        assert code == 0, err
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_calibrated_runs_in_two_processes_give_the_same_bytes(tmp_path):
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, audio_features=np.random.default_rng(0).random((6, 1, 40, 100)).astype(np.float32))
    procs = []
    for seed in ("1", "2"):  # different hash seeds: no dict/set order may leak into the output
        command = [sys.executable, "-m", "dsrewrite", str(SAMPLES / "audio_conv1d.onnx"), "-o", str(tmp_path / f"{seed}.onnx"),
                   "--rank", "2", "--calibration", str(calibration), "-q", "--no-benchmark"]  # fmt: skip
        env = {**os.environ, "PYTHONHASHSEED": seed}
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert (tmp_path / "1.onnx").read_bytes() == (tmp_path / "2.onnx").read_bytes()


# -- the environment fails ------------------------------------------------------------------------


def test_a_full_disk_is_one_error_line_and_leaves_no_temp_files(ws, monkeypatch):
    import errno

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the one os module: model_io looks it up at each call
    code, out, err = dsrewrite_cli(ws.model, "-o", ws.outputs / "slim.onnx", "--rank", "1", "--report", ws.outputs / "r.json")
    assert_clean_failure(code, out, err, message="No space left on device")
    assert _leftovers(ws.outputs) == []
    monkeypatch.setattr(limits, "EXTERNAL_DATA_THRESHOLD", 100)  # the same with model + external data
    # save_model's single-file write now "succeeds" writing nothing: only the external-data path can fail here.
    monkeypatch.setattr(external, "atomic_write_bytes", lambda *a: None)
    code, out, err = dsrewrite_cli(ws.model, "-o", ws.outputs / "slim.onnx", "--rank", "1")
    assert_clean_failure(code, out, err, message="No space left on device")
    assert _leftovers(ws.outputs) == []


def test_a_closed_stdout_still_writes_the_model(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(in_channels=4, out_channels=8), str(model))
    command = [sys.executable, "-m", "dsrewrite", str(model), "-o", str(tmp_path / "slim.onnx"), "--rank", "1", "--no-benchmark"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `dsrewrite … | head -0`: the table hits EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""
    onnx.checker.check_model(str(tmp_path / "slim.onnx"), full_check=True)
