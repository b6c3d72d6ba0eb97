"""The command line, driven through click's CliRunner: exit codes, error lines, files written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, conv_model, dsrewrite_cli, random_input, run
from onnx import helper, numpy_helper



@pytest.fixture
def vgg(tmp_path):
    path = tmp_path / "vgg.onnx"
    shutil.copy(SAMPLES / "vgg_small.onnx", path)
    return path


def files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_rewrites_a_sample_model_and_writes_the_json_report(vgg, tmp_path):
    before = vgg.read_bytes()
    code, out, err = dsrewrite_cli(vgg, "-o", tmp_path / "slim.onnx", "--rank", "1", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "rank 1" in out and "Verification in onnxruntime: COMPARED" in out  # no tolerance: no "passed"
    assert vgg.read_bytes() == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["schema"] == "dsrewrite.report/1"
    assert set(report["model"]) >= {"input", "output", "opset"}
    assert report["model"]["output"] == str(tmp_path / "slim.onnx")
    assert set(report["totals"]) >= {
        "macs_before", "macs_after", "params_before", "params_after", "eligible_macs_before", "eligible_macs_after",
    }  # fmt: skip
    assert report["settings"]["rank"] == 1
    fields = {
        "node", "status", "reason", "rank", "kernel", "in_channels", "out_channels", "group",
        "macs_before", "macs_after", "params_before", "params_after", "weight_error", "output_error",
    }  # fmt: skip
    assert len(report["layers"]) == 6
    for layer in report["layers"]:
        assert fields <= set(layer)
        assert layer["status"] == "rewritten" and layer["reason"] is None
        assert layer["macs_after"] / layer["macs_before"] == pytest.approx(
            1 / layer["out_channels"] + 1 / 9, rel=1e-12
        )
    assert report["totals"]["macs_after"] == sum(layer["macs_after"] for layer in report["layers"])
    verification = report["verification"]
    assert verification["ran"] and verification["passed"] is None  # the contract: null without a tolerance
    assert set(verification["outputs"][0]) >= {"name", "max_abs", "mean_abs", "max_rel", "cosine"}
    onnx.checker.check_model(onnx.load(str(tmp_path / "slim.onnx")), full_check=True)


def test_full_rank_is_verified_with_default_tolerances(vgg, tmp_path):
    code, out, err = dsrewrite_cli(vgg, "-o", tmp_path / "full.onnx", "--rank", "full", "--report", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["atol"] > 0 and report["verification"]["passed"]
    x = random_input((1, 3, 64, 64))
    expected = run(onnx.load(str(vgg)), {"input": x})[0]
    actual = run(onnx.load(str(tmp_path / "full.onnx")), {"input": x})[0]
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)


def test_verification_failure_exits_1_and_writes_no_model(vgg, tmp_path):
    code, out, err = dsrewrite_cli(vgg, "-o", tmp_path / "slim.onnx", "--rank", "1", "--atol", "1e-6",
                                   "--report", tmp_path / "r.json")  # fmt: skip
    assert code == 1
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "slim.onnx").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["passed"] is False
    assert report["model"]["output"] is None


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rank", "0"], "rank"),
        (["--rank", "-3"], "rank"),
        (["--rank", "abc"], "rank"),
        (["--max-error", "-1"], "max-error"),
        (["--max-error", "x"], "max-error"),
        (["--atol", "-1"], "atol"),
        (["--input-shape", "input"], "input-shape"),
        (["--input-shape", "input:1,x"], "input-shape"),
        (["--input-shape", "nope:1,3,8,8"], "unknown input"),
        (["--input-shape", "input:1,3,8"], "rank"),
        (["--report", "r.txt"], "format"),
        (["--no-such-flag"], "no-such-flag"),
    ],
)
def test_bad_options_give_one_error_line_and_exit_2(vgg, tmp_path, args, message):
    code, out, err = dsrewrite_cli(vgg, "-o", tmp_path / "slim.onnx", *args)
    assert code == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in err + out
    assert files(tmp_path) == ["vgg.onnx"]


@pytest.mark.parametrize("content", [None, b"", b"garbage bytes", b"\x08\x07" * 50])
def test_bad_model_files_exit_2(tmp_path, content):
    model = tmp_path / "bad.onnx"
    if content is not None:
        model.write_bytes(content)
    code, out, err = dsrewrite_cli(model, "-o", tmp_path / "out.onnx")
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.onnx").exists()


def test_output_paths_are_checked_before_any_work(vgg, tmp_path):
    for output in (tmp_path / "missing" / "o.onnx", vgg / "o.onnx", vgg):
        code, _, err = dsrewrite_cli(vgg, "-o", output)
        assert code == 2 and err.startswith("error:"), err
    code, _, err = dsrewrite_cli(vgg)
    assert code == 2 and "--output" in err


def test_overwrite_allows_replacing_the_input(vgg):
    code, _, err = dsrewrite_cli(vgg, "-o", vgg, "--rank", "1", "--overwrite", "-q")
    assert code == 0, err
    assert "vgg/dw0" not in err
    assert any(n.name == "conv1/dw0" for n in onnx.load(str(vgg)).graph.node)


def test_a_model_without_convs_is_written_unchanged(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    code, out, err = dsrewrite_cli(path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "Nothing to rewrite" in out
    assert [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node] == ["Relu"]
    assert json.loads((tmp_path / "r.json").read_text())["layers"] == []


def test_nan_weights_are_skipped_not_fatal(tmp_path):
    model = conv_model(in_channels=8, out_channels=8)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[1, 2] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    code, out, err = dsrewrite_cli(path, "-o", tmp_path / "out.onnx", "--rank", "1")
    assert code == 0, err
    assert "NaN or Inf" in out


def test_dry_run_writes_no_model(vgg, tmp_path):
    code, out, err = dsrewrite_cli(vgg, "--dry-run", "--rank", "1", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert files(tmp_path) == ["r.json", "vgg.onnx"]
    assert "rank 1" in out


def test_dynamic_batch_sample_reports_per_sample_macs(tmp_path):
    code, out, err = dsrewrite_cli(SAMPLES / "dynamic_batch.onnx", "-o", tmp_path / "o.onnx", "--rank", "1",
                                   "--report", tmp_path / "r.json")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["macs_before"] > 0
    assert any("per sample" in note for note in report["notes"])
    fixed = tmp_path / "r8.json"
    code, _, err = dsrewrite_cli(SAMPLES / "dynamic_batch.onnx", "-o", tmp_path / "o8.onnx", "--rank", "1",
                                 "--input-shape", "images:8,3,48,48", "--report", fixed)  # fmt: skip
    assert code == 0, err
    assert json.loads(fixed.read_text())["totals"]["macs_before"] == 8 * report["totals"]["macs_before"]


def test_version_and_help():
    code, out, _ = dsrewrite_cli("--version")
    assert code == 0 and "dsrewrite" in out
    code, out, _ = dsrewrite_cli("--help")
    assert code == 0 and "--rank" in out


def test_plan_out_may_not_clobber_the_model_or_a_report(vgg, tmp_path):
    for clash in (["-o", tmp_path / "x.onnx", "--plan-out", tmp_path / "x.onnx"],
                  ["-o", tmp_path / "y.onnx", "--report", tmp_path / "r.json", "--plan-out", tmp_path / "r.json"]):
        code, _, err = dsrewrite_cli(vgg, *clash)
        assert code == 2 and "--plan-out" in err, err
    code, _, err = dsrewrite_cli(vgg, "-o", tmp_path / "z.onnx", "--max-error", "inf")
    assert code == 2 and "max-error" in err


def test_an_interrupt_while_the_libraries_load_is_one_error_line(monkeypatch, capsys):
    import builtins
    import sys

    from dsrewrite import entry

    real_import = builtins.__import__

    def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 1 and name == "cli":
            raise KeyboardInterrupt
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.delitem(sys.modules, "dsrewrite.cli", raising=False)
    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as info:
        entry.main(["--version"])
    assert info.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_the_package_imports_lazily():
    import subprocess
    import sys

    code = "import sys, dsrewrite; print('onnxruntime' in sys.modules); print(callable(dsrewrite.rewrite))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
