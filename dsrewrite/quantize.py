"""INT8 as a deployment target: static QDQ quantization through ``onnxruntime.quantization``.

No quantizer of our own: ``quantize_static`` with QDQ nodes, per-channel
QInt8 weights and QUInt8 activations (onnxruntime's recommended CPU setting),
activation ranges calibrated (MinMax) on the feeds given. Per-channel QDQ needs
opset 13; older models are converted with ``onnx.version_converter`` first, and
a model that cannot be converted is an input error.

The same function quantizes the single-conv candidates that are timed when
``--quantize int8`` is on, so forms are compared in the precision they will run
in: a depthwise conv that wins in float32 can lose once quantized.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Iterable, Mapping

import numpy as np
import onnx

from .errors import InputError

log = logging.getLogger(__name__)

INT8 = "int8"
TARGETS = (INT8,)
MIN_OPSET = 13  # per-channel DequantizeLinear (axis attribute)


def quantize_int8(
    model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]] | None, *, calibration_cache: str | None = None
) -> onnx.ModelProto:
    """``model`` with QDQ INT8 convs (and every other op onnxruntime quantizes), calibrated on ``feeds``.

    ``calibration_cache``: ``quantize_static``'s own cache of activation ranges (JSON). An existing file is used
    instead of a calibration run (``feeds`` may then be None); a missing one is written after calibrating.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415

    # quantize_static's own calibration sessions log every initializer they drop at WARNING; dsrewrite's sessions
    # already run at FATAL, so only errors of these reach stderr.
    onnxruntime.set_default_logger_severity(3)

    from .model_io import save_model  # noqa: PLC0415
    from .model_io.protos import serialized_size  # noqa: PLC0415

    model = with_min_opset(model, MIN_OPSET)
    with tempfile.TemporaryDirectory(prefix="dsrewrite-int8-") as tmp, _quiet_root_logger():
        # Handed a path, not the ModelProto: given a proto, quantize_static moves its tensors to external data in place.
        source, path = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        save_model(model, source)
        large = serialized_size(model) > 1_800_000_000  # protobuf's 2 GiB limit, with room for the QDQ nodes
        cache = calibration_cache or os.path.join(tmp, "ranges.json")
        if not os.path.isfile(cache):
            _calibrate(source, feeds, cache, large, tmp)
        quantize_static(
            source, path, None, quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, use_external_data_format=large,
            calibration_cache_path=cache,
        )  # fmt: skip
        return onnx.load(path)


def _calibrate(source: str, feeds: Iterable[Mapping[str, np.ndarray]] | None, cache: str, large: bool, tmp: str) -> None:
    """Write the MinMax activation ranges of the model at ``source`` over ``feeds`` to ``cache``, in the format
    ``quantize_static`` reads as its calibration cache.

    This is ``quantize_static``'s own calibrator, run in a session that bounds its memory. Its augmented model
    appends a ReduceMin and a ReduceMax per tensor at the end of the node list, and onnxruntime's default execution
    order runs them last, so every intermediate tensor of the model is held until the end of the run; the arena then
    keeps that block and plans a second one (1.8 GB for the PP-OCR detector at 736×736). The priority-based order
    takes each range as soon as the tensor exists (0.16 GB). The ranges, and the quantized model, are the same.
    """
    import onnxruntime  # noqa: PLC0415
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator, save_tensors_data  # noqa: PLC0415

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds or ())

        def get_next(self):
            return next(self._feeds, None)

    calibrator = create_calibrator(
        source, augmented_model_path=os.path.join(tmp, "augmented.onnx"), calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=large, providers=["CPUExecutionProvider"],
    )  # fmt: skip
    calibrator.infer_session = None  # its own session, in the default order: gone before ours holds the weights
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibrator's own
    options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
    calibrator.infer_session = onnxruntime.InferenceSession(
        calibrator.augmented_model_path, options, providers=["CPUExecutionProvider"]
    )
    calibrator.collect_data(Reader())  # raises ValueError on no feeds
    save_tensors_data(calibrator.compute_data(), cache)


class TimingRanges:
    """The activation ranges of the deployed working model, reused for every model timed against it.

    A timing candidate is the working model with some convs rewritten. Calibrating each one is a full calibration
    run per candidate (2.5 s against 0.9 s without it on the PP-OCR detector, one feed), for ranges that do not
    change its speed. So the working model's ranges, calibrated once on all the calibration feeds, are handed to
    ``quantize_static`` as its calibration cache; a tensor the rewrite added takes the range of the output of the
    conv it replaces. The unchanged part of every candidate is then quantized exactly as the reference it is timed
    against.
    """

    def __init__(self, payload: dict):
        self._payload = payload
        data = payload.get("data", {})
        lows = [v["lowest"]["data"][0] for v in data.values() if _scalar_range(v)]
        highs = [v["highest"]["data"][0] for v in data.values() if _scalar_range(v)]
        self._widest = _range_entry(min(lows, default=-1.0), max(highs, default=1.0))

    @classmethod
    def calibrate(cls, model: onnx.ModelProto, feeds) -> tuple[onnx.ModelProto, "TimingRanges | None"]:
        """``model`` quantized on ``feeds``, and its ranges (None if onnxruntime wrote no readable cache)."""
        import json  # noqa: PLC0415

        with tempfile.TemporaryDirectory(prefix="dsrewrite-ranges-") as tmp:
            cache = os.path.join(tmp, "ranges.json")
            quantized = quantize_int8(model, feeds, calibration_cache=cache)
            try:
                with open(cache) as f:
                    return quantized, cls(json.load(f))
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                return quantized, None

    def quantize(self, model: onnx.ModelProto, owners: Mapping[str, str]) -> onnx.ModelProto:
        """``model`` quantized with these ranges; ``owners`` maps each rewritten node to its conv's output."""
        import json  # noqa: PLC0415

        data = dict(self._payload.get("data", {}))
        weights = {t.name for t in model.graph.initializer}
        for node in model.graph.node:
            owner = owners.get(node.name)
            if owner is None:
                continue
            for tensor in list(node.input) + list(node.output):
                if tensor and tensor not in data and tensor not in weights:
                    data[tensor] = self._payload["data"].get(owner, self._widest)
        with tempfile.TemporaryDirectory(prefix="dsrewrite-ranges-") as tmp:
            cache = os.path.join(tmp, "ranges.json")
            with open(cache, "w") as f:
                json.dump({**self._payload, "data": data}, f)
            return quantize_int8(model, None, calibration_cache=cache)


def _scalar_range(entry) -> bool:
    try:
        return len(entry["lowest"]["data"]) == 1 and len(entry["highest"]["data"]) == 1
    except (KeyError, TypeError):
        return False


def _range_entry(low: float, high: float) -> dict:
    """One tensor's range in the cache's JSON form (``onnxruntime.quantization.calibrate.TensorData``)."""

    def value(v: float) -> dict:
        return {"data": [float(v)], "dtype": "float32", "CLS": "numpy.array"}

    return {"lowest": value(low), "highest": value(high), "CLS": "TensorData"}


def timing_label(precision: str | None) -> str:
    """Where timings come from, for the report: "onnxruntime", or e.g. "onnxruntime, INT8"."""
    return "onnxruntime" if precision is None else f"onnxruntime, {precision.upper()}"


def with_min_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``model`` itself when its default-domain opset is at least ``version``, else a converted copy."""
    from .pipeline import default_opset  # noqa: PLC0415

    current = default_opset(model)
    if current >= version:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError and friends
        raise InputError(
            f"INT8 quantization needs opset >= {version} (per-channel QDQ) and this opset-{current} model "
            f"cannot be converted: {' '.join(str(exc).split())[:200]}"
        ) from None
    log.info("converted the model from opset %d to %d for per-channel INT8", current, version)
    return converted


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization advises pre-processing on the root logger at every call; keep that off stderr."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
