"""model_io: validation of inputs, atomic writes, external data, kept metadata."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from conftest import conv_model, random_input, run
from onnx import helper

import dsrewrite
from dsrewrite.errors import InputError, UsageError
from dsrewrite.model_io import atomic_write_bytes, check_output_path, load_model, save_model


def test_load_rejects_unusable_files(tmp_path):
    cases = {
        "missing": None,
        "empty": b"",
        "random": np.random.default_rng(0).bytes(4096),
        "text": b"this is not a model\n" * 20,
        "truncated": conv_model().SerializeToString()[:100],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.onnx"
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(InputError):
            load_model(path)
    with pytest.raises(InputError, match="directory"):
        load_model(tmp_path)


def test_load_rejects_a_protobuf_that_is_not_a_model(tmp_path):
    path = tmp_path / "tensor.onnx"
    path.write_bytes(onnx.numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString())
    with pytest.raises(InputError):
        load_model(path)


def test_load_rejects_a_newer_opset(tmp_path):
    model = conv_model()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="opset"):
        load_model(path)


def test_missing_external_data_is_an_input_error(tmp_path):
    model = conv_model(in_channels=16, out_channels=16)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(InputError, match="external data"):
        load_model(path)


def test_external_data_round_trip_with_a_low_threshold(tmp_path):
    model = conv_model(in_channels=16, out_channels=16)
    result = dsrewrite.rewrite(model, rank=2, verify=False)
    out = tmp_path / "slim.onnx"
    written = save_model(result.model, out, external_data_threshold=1000)
    assert written == [out, tmp_path / "slim.onnx.data"]
    assert (tmp_path / "slim.onnx.data").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim.onnx", "slim.onnx.data"], "no temp files left"
    reloaded = load_model(out)
    x = random_input((1, 16, 9, 9))
    np.testing.assert_array_equal(run(reloaded, {"x": x})[0], run(result.model, {"x": x})[0])


def test_metadata_names_and_dynamic_dims_are_kept(tmp_path):
    model = conv_model(batch="N", spatial=("H", 9))
    model.producer_name, model.producer_version, model.doc_string = "exporter", "9.9", "my model"
    model.model_version = 3
    helper.set_model_props(model, {"author": "me", "task": "demo"})
    model.graph.doc_string = "graph doc"
    result = dsrewrite.rewrite(model, rank=1, verify=False)
    out = result.model
    assert (out.ir_version, out.producer_name, out.producer_version, out.doc_string, out.model_version) == (
        model.ir_version, "exporter", "9.9", "my model", 3,
    )  # fmt: skip
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me", "task": "demo"}
    assert list(out.opset_import) == list(model.opset_import)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 4, "H", 9]


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_output_path_checks(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(UsageError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.onnx")
    with pytest.raises(UsageError, match="not a directory"):
        check_output_path(model / "out.onnx")
    with pytest.raises(UsageError, match="--overwrite"):
        check_output_path(model, input_path=model)
    check_output_path(model, input_path=model, overwrite=True)
    with pytest.raises(UsageError, match="directory"):
        check_output_path(tmp_path)


def test_an_output_without_a_shape_is_repaired_with_a_note_and_the_result_passes_the_checker(tmp_path):
    from conftest import dsrewrite_cli

    model = conv_model(pads=(1, 1, 1, 1))
    model.graph.output[0].type.tensor_type.ClearField("shape")  # what graphsurgeon writes for an unknown shape
    with pytest.raises(Exception):
        onnx.checker.check_model(model)
    before = model.SerializeToString()
    result = dsrewrite.rewrite(model, rank=1)
    assert model.SerializeToString() == before  # the caller's model is never modified
    assert any("fails the ONNX checker" in n and "filled the shape of output 'y'" in n for n in result.report.notes)
    onnx.checker.check_model(result.model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    code, _out, err = dsrewrite_cli(path, "-o", tmp_path / "slim.onnx", "--rank", "1", "--no-benchmark")
    assert code == 0, err
    assert err.startswith("warning: ") and "fails the ONNX checker" in err and "repaired it" in err
    onnx.checker.check_model(str(tmp_path / "slim.onnx"), full_check=True)


def test_other_checker_defects_are_still_refused(tmp_path):
    model = conv_model()
    model.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="fails the ONNX checker"):
        load_model(path, repairs=[])
