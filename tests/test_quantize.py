"""quantize: INT8 through onnxruntime.quantization, and the ranges timing candidates share with their reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import conv_model, ops
from onnx import helper, numpy_helper

from dsrewrite.quantize import TimingRanges, quantize_int8


def _relu_conv(channels=8):
    model = conv_model(in_channels=channels, out_channels=16, pads=(1, 1, 1, 1), spatial=(12, 12))
    model.graph.node[-1].output[0] = "t"
    model.graph.node.append(helper.make_node("Relu", ["t"], ["y"], name="relu"))
    return model


def _rank1_candidate(model):
    """The conv of ``model`` as depthwise + pointwise (any weights: only the structure is timed)."""
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    graph = candidate.graph
    conv = graph.node[0]
    m = numpy_helper.to_array(next(i for i in graph.initializer if i.name == "W")).shape[1]
    rng = np.random.default_rng(1)
    graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((m, 1, 3, 3)).astype(np.float32), "conv/dw/W"),
        numpy_helper.from_array(rng.standard_normal((16, m, 1, 1)).astype(np.float32), "conv/pw/W"),
    ])  # fmt: skip
    dw = helper.make_node("Conv", ["x", "conv/dw/W"], ["conv/dw_out"], name="conv/dw", group=m, pads=[1, 1, 1, 1])
    pw = helper.make_node("Conv", ["conv/dw_out", "conv/pw/W", "B"], ["t"], name="conv/pw")
    graph.node.remove(conv)
    graph.node.insert(0, pw)
    graph.node.insert(0, dw)
    return candidate


def _scales(model):
    """Each quantized tensor's scale, by the tensor its QuantizeLinear reads."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_timing_candidates_reuse_the_reference_ranges_without_a_calibration_run(monkeypatch):
    model = _relu_conv()
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 8, 12, 12)).astype(np.float32)} for i in range(4)]
    reference, ranges = TimingRanges.calibrate(model, feeds)
    assert ranges is not None and _scales(reference) == _scales(quantize_int8(model, feeds))

    candidate = _rank1_candidate(model)
    calibrations = []
    import onnxruntime.quantization.calibrate as calibrate  # noqa: PLC0415

    real = calibrate.MinMaxCalibrater.collect_data
    monkeypatch.setattr(calibrate.MinMaxCalibrater, "collect_data", lambda self, reader: calibrations.append(1) or real(self, reader))
    quantized = ranges.quantize(candidate, {"conv/dw": "t", "conv/pw": "t"})
    assert not calibrations  # the cache stood in for the calibration run
    # The same structure as a calibrated quantization of the candidate ...
    assert sorted(ops(quantized)) == sorted(ops(quantize_int8(candidate, feeds[:1])))
    assert calibrations
    # ... and the unchanged tensors quantized exactly as in the reference it is timed against; the new tensor
    # takes the range of the output of the conv it replaces.
    scales, before = _scales(quantized), _scales(reference)
    assert scales["x"] == before["x"] and scales["y_QuantizeLinear_Input"] == before["y_QuantizeLinear_Input"]
    t = ranges._payload["data"]["t"]
    low, high = t["lowest"]["data"][0], t["highest"]["data"][0]
    assert scales["conv/dw_out"] == pytest.approx((high - low) / 255)  # QUInt8 over the conv output's range


def test_a_candidate_the_shared_ranges_cannot_quantize_is_calibrated_on_its_own(monkeypatch):
    import dsrewrite

    def refuse(self, model, owners):
        raise KeyError("a tensor without a range")

    used = []
    monkeypatch.setattr(TimingRanges, "quantize", refuse)
    real = quantize_int8

    def recorded(model, feeds, **kw):
        feeds = list(feeds) if feeds is not None else None
        used.append((len(feeds or []), kw))
        return real(model, feeds, **kw)

    monkeypatch.setattr("dsrewrite.quantize.quantize_int8", recorded)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 16, 16, 16)).astype(np.float32)} for i in range(4)]
    model = conv_model(in_channels=16, out_channels=32, spatial=(16, 16), pads=(1, 1, 1, 1))
    result = dsrewrite.rewrite(model, rank=1, calibration=feeds, quantize="int8", latency_aware=True, verify=False, benchmark=False)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops(result.model))
    assert (1, {}) in used  # the fallback: the candidate calibrated on one feed of its own


def test_the_calibration_gives_quantize_statics_own_ranges_and_model(tmp_path):
    """dsrewrite runs quantize_static's calibrator in a session of its own ordering (to bound memory); the ranges
    and the quantized model must be those of quantize_static calibrating by itself."""
    import json  # noqa: PLC0415

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: PLC0415

    model = _relu_conv()
    model.graph.node.append(helper.make_node("Sigmoid", ["y"], ["z"], name="sig"))
    model.graph.output[0].name = "z"
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 8, 12, 12)).astype(np.float32)} for i in range(5)]
    ours = quantize_int8(model, feeds, calibration_cache=str(tmp_path / "ours.json"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    onnx.save(model, tmp_path / "float.onnx")
    quantize_static(
        str(tmp_path / "float.onnx"), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
        calibration_cache_path=str(tmp_path / "theirs.json"),
    )  # fmt: skip
    theirs = json.loads((tmp_path / "theirs.json").read_text())["data"]
    assert {k: v for k, v in json.loads((tmp_path / "ours.json").read_text())["data"].items() if k in theirs} == theirs
    assert ours.graph.SerializeToString() == onnx.load(tmp_path / "int8.onnx").graph.SerializeToString()


def test_no_feeds_and_no_cache_is_refused():
    with pytest.raises(ValueError):
        quantize_int8(_relu_conv(), [])
