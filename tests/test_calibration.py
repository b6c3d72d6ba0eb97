"""calibration: feed validation, patch extraction against onnxruntime, streamed statistics."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import conv_model, random_input, run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from dsrewrite import lowrank
from dsrewrite.calibration import (
    CalibrationSet,
    ConvGeometry,
    RegressionAccumulator,
    capture,
    extract_patches,
    flatten_output,
)
from dsrewrite.errors import InputError, UsageError


@st.composite
def geometries(draw):
    d = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(d)) if not auto_pad.startswith("SAME") else (1,) * d
    pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * d)) if auto_pad == "NOTSET" else (0,) * (2 * d)
    strides = tuple(draw(st.integers(1, 2)) for _ in range(d))
    spatial = tuple(dl * (k - 1) + 1 + draw(st.integers(0, 4)) for k, dl in zip(kernel, dilations))
    return ConvGeometry(kernel, strides, pads, dilations, auto_pad), spatial


@settings(max_examples=40, deadline=None)
@given(geometries(), st.integers(1, 2))
def test_patches_times_the_kernel_is_the_conv(geometry_and_spatial, batch):
    """im2col must match onnxruntime's Conv for every padding mode, stride and dilation."""
    geometry, spatial = geometry_and_spatial
    model = conv_model(
        in_channels=3, out_channels=4, kernel=geometry.kernel_shape, spatial=spatial, strides=geometry.strides,
        dilations=geometry.dilations, bias=False, batch=batch,
        pads=geometry.pads if geometry.auto_pad == "NOTSET" else None,
        auto_pad=None if geometry.auto_pad == "NOTSET" else geometry.auto_pad,
    )  # fmt: skip
    x = random_input((batch, 3, *spatial))
    (y,) = run(model, {"x": x})
    weight = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    patches = extract_patches(x.astype(np.float64), geometry)
    ours = weight.reshape(4, -1) @ patches.reshape(-1, patches.shape[2])
    np.testing.assert_allclose(ours, flatten_output(y), atol=1e-4)


def test_accumulated_statistics_give_the_direct_error():
    rng = np.random.default_rng(0)
    acc = RegressionAccumulator(in_channels=4, out_channels=6, taps=9, groups=2)
    xs, ys = [], []
    for _ in range(3):
        x, y = rng.standard_normal((4, 9, 50)), rng.standard_normal((6, 50))
        acc.add(x, y)
        xs.append(x)
        ys.append(y)
    stats = acc.finish()
    w = rng.standard_normal((2, 3, 19))
    x = np.concatenate(xs, axis=2).reshape(2, 18, -1)
    x = np.concatenate([x, np.ones((2, 1, x.shape[2]))], axis=1)
    y = np.concatenate(ys, axis=1).reshape(2, 3, -1)
    direct = float(((y - w @ x) ** 2).sum())
    assert lowrank.regression_error(w, stats) == pytest.approx(direct, rel=1e-9)


# -- feeds ------------------------------------------------------------------------------------


@pytest.fixture
def model():
    return conv_model(batch="N", spatial=(9, 9))


def test_npz_samples_on_axis_0_are_split_into_feeds(model, tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=random_input((5, 4, 9, 9)))
    feeds = list(CalibrationSet(path, model))
    assert len(feeds) == 5 and feeds[0]["x"].shape == (1, 4, 9, 9)
    assert len(CalibrationSet(path, model, limit=2)) == 2


def test_a_directory_holds_one_feed_per_file(model, tmp_path):
    for i, batch in enumerate([1, 3]):
        np.savez(tmp_path / f"{i}.npz", x=random_input((batch, 4, 9, 9)))
    calibration = CalibrationSet(tmp_path, model)
    assert [f["x"].shape[0] for f in calibration] == [1, 3]
    assert [f["x"].shape[0] for f in calibration] == [1, 3], "re-iterable"


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"y": np.zeros((2, 4, 9, 9), np.float32)}, "unknown input"),
        ({"x": np.zeros((2, 4, 9, 9), np.int64)}, "dtype"),  # integers for a float input stay refused
        ({"x": np.full((2, 4, 9, 9), 1e300)}, "too large for the model's float32"),
        ({"x": np.zeros((2, 9, 9), np.float32)}, "rank"),
        ({"x": np.zeros((2, 5, 9, 9), np.float32)}, "shape"),
    ],
)
def test_bad_calibration_arrays_are_input_errors(model, tmp_path, arrays, message):
    path = tmp_path / "c.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=message):
        CalibrationSet(path, model)


def test_missing_garbage_and_empty_calibration(model, tmp_path):
    with pytest.raises(InputError, match="not found"):
        CalibrationSet(tmp_path / "nope.npz", model)
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not an npz")
    with pytest.raises(InputError, match="cannot read"):
        CalibrationSet(garbage, model)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no .npz"):
        CalibrationSet(empty_dir, model)
    with pytest.raises(InputError, match="lacks"):
        CalibrationSet([{}], model)
    with pytest.raises(UsageError):
        CalibrationSet([{"x": random_input((1, 4, 9, 9))}], model, limit=0)


def test_capture_batches_and_falls_back_to_single_feeds():
    dynamic = conv_model(batch="N", spatial=(9, 9))
    fixed = conv_model(batch=1, spatial=(9, 9))
    feeds = [{"x": random_input((1, 4, 9, 9), seed=i)} for i in range(5)]
    for model in (dynamic, fixed):
        groups = list(capture(model, ["x", "y"], feeds, batch_size=4))
        assert sum(count for _, count in groups) == 5
        (expected,) = run(model, feeds[4])
        np.testing.assert_allclose(groups[-1][0]["y"][-1:], expected, rtol=1e-5, atol=1e-5)
    assert [count for _, count in capture(dynamic, ["y"], feeds, batch_size=4)] == [4, 1]


def test_capture_runs_only_what_the_wanted_tensors_depend_on(monkeypatch):
    from onnx import TensorProto, helper

    from dsrewrite import calibration

    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal((4, 4, 3, 3)).astype(np.float32) for name in ("Wa", "Wb", "Wc")}
    branch = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["inner"])], "then", [], [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)]
    )
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "Wb"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("If", ["flag"], ["c"], then_branch=branch, else_branch=branch),  # reads 'a' from outside
        helper.make_node("Conv", ["x", "Wc"], ["unused"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
         helper.make_tensor_value_info("Wc", TensorProto.FLOAT, [4, 4, 3, 3])],  # a weight listed as an input too
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("b", "c", "unused")],
        initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()]
        + [numpy_helper.from_array(np.array(True), "flag")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    seen, real_session = [], calibration.session
    monkeypatch.setattr(calibration, "session", lambda probe, **kw: seen.append(probe) or real_session(probe, **kw))
    feed = {"x": random_input((1, 4, 6, 6))}
    ((values, _),) = capture(model, ["c", "x"], [feed])
    (probe,) = seen
    assert [n.op_type for n in probe.graph.node] == ["Conv", "If"]
    assert {i.name for i in probe.graph.initializer} == {"Wa", "flag"} and [i.name for i in probe.graph.input] == ["x"]
    np.testing.assert_allclose(values["c"], run(model, feed)[1], rtol=1e-6)
    assert len(model.graph.node) == 4  # the caller's model is untouched


@settings(max_examples=30, deadline=None)
@given(geometries(), st.integers(1, 2), st.integers(0, 2**16))
def test_sampled_patches_are_the_same_columns(geometry_and_spatial, batch, seed):
    geometry, spatial = geometry_and_spatial
    x = np.random.default_rng(seed).standard_normal((batch, 3, *spatial))
    full = extract_patches(x, geometry)
    positions = np.sort(np.random.default_rng(seed).choice(full.shape[2], size=max(1, full.shape[2] // 2), replace=False))
    np.testing.assert_array_equal(extract_patches(x, geometry, positions), full[:, :, positions])


def test_float64_calibration_is_cast_to_the_models_float_type_with_a_note(tmp_path):
    import dsrewrite
    from conftest import conv_model

    path = tmp_path / "c.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((4, 1, 4, 9, 9)))  # numpy's default: float64
    calibration = CalibrationSet(path, conv_model())
    assert calibration.casts == {"x": ("float64", "float32")}
    assert all(feed["x"].dtype == np.float32 for feed in calibration)
    result = dsrewrite.rewrite(conv_model(pads=(1, 1, 1, 1)), rank=2, calibration=path)
    assert "calibration input 'x' was float64: cast to the model's float32" in result.report.notes


def test_dynamic_dims_are_costed_at_the_calibration_shape(tmp_path):
    import dsrewrite
    from conftest import conv_model

    model = conv_model(batch="N", spatial=(9, "W"), pads=(1, 1, 1, 1))  # like a CTC reader's 1x1x64xW
    unknown = dsrewrite.rewrite(model, rank=2, verify=False)
    assert unknown.report.totals.macs_before is None
    path = tmp_path / "c.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((6, 1, 4, 9, 20)).astype(np.float32))
    known = dsrewrite.rewrite(model, rank=2, calibration=path, verify=False)
    (layer,) = known.report.layers
    assert layer.macs_before == 6 * 4 * 9 * 9 * 20  # N·M·K per output pixel, 9x20 outputs, batch 1
    assert any("costed at the calibration feeds' shape (1x4x9x20)" in n for n in known.report.notes)
    fixed = dsrewrite.rewrite(model, rank=2, calibration=path, verify=False, input_shapes={"x": (1, 4, 9, 10)})
    assert fixed.report.layers[0].macs_before == 6 * 4 * 9 * 9 * 10  # --input-shape wins


def test_feeds_of_several_shapes_are_costed_at_their_average(tmp_path):
    import dsrewrite
    from conftest import conv_model

    model = conv_model(batch="N", spatial=(9, "W"), pads=(1, 1, 1, 1))
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    rng = np.random.default_rng(0)
    for i, width in enumerate([20, 20, 11]):  # a directory: one feed per file, sizes may differ
        np.savez(feeds / f"{i}.npz", x=rng.standard_normal((1, 4, 9, width)).astype(np.float32))
    result = dsrewrite.rewrite(model, rank=2, calibration=feeds, verify=False)
    (layer,) = result.report.layers
    pixels = round((2 * 9 * 20 + 9 * 11) / 3)
    assert layer.macs_before == 6 * 4 * 9 * pixels and layer.macs_after == layer.macs_per_pixel_after * pixels
    assert any("average over the calibration feeds' 2 shapes" in n and "2 of 3 feeds" in n for n in result.report.notes)


def test_an_uncompressed_npz_is_read_a_sample_at_a_time_with_the_same_feeds(model, tmp_path):
    data = random_input((6, 4, 9, 9)).astype(np.float64)  # cast per feed, as when held
    np.savez(tmp_path / "stored.npz", x=data)
    np.savez_compressed(tmp_path / "compressed.npz", x=data)
    stored = CalibrationSet(tmp_path / "stored.npz", model, limit=5)
    held = CalibrationSet(tmp_path / "compressed.npz", model, limit=5)
    assert stored._stored is not None and stored._feeds is None  # nothing of the file is held
    assert held._stored is None
    assert len(stored) == len(held) == 5 and stored.casts == held.casts
    for _ in range(2):  # re-iterable
        pairs = list(zip(stored, held, strict=True))
        assert all(a["x"].dtype == b["x"].dtype == np.float32 and np.array_equal(a["x"], b["x"]) for a, b in pairs)


def test_a_stored_array_reads_the_samples_asked_for(tmp_path):
    from dsrewrite.calibration import StoredArray  # noqa: PLC0415

    data = np.arange(2 * 3 * 5, dtype=np.int16).reshape(2, 3, 5).astype(">i2")  # a non-native byte order too
    np.savez(tmp_path / "a.npz", a=data, f=np.asfortranarray(data), s=np.float32(1))
    members = StoredArray.members(tmp_path / "a.npz")
    assert set(members) == {"a.npy"}  # Fortran order and a 0-d array are read whole
    a = members["a.npy"]
    assert a.shape == (2, 3, 5) and a.ndim == 3
    assert np.array_equal(a[1], data[1]) and np.array_equal(a[0:2], data) and np.array_equal(a[1:1], data[1:1])
    with pytest.raises(IndexError):
        a[2]
    with pytest.raises(IndexError):
        a[0:2:2]


def test_a_bad_sample_in_an_uncompressed_npz_fails_before_any_work(model, tmp_path):
    data = random_input((4, 4, 9, 9))
    data[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "c.npz", x=data)
    with pytest.raises(InputError, match=r"sample 3\).*NaN"):
        CalibrationSet(tmp_path / "c.npz", model)
