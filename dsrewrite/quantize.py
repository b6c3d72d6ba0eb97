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


def quantize_int8(model: onnx.ModelProto, feeds: Iterable[Mapping[str, np.ndarray]]) -> onnx.ModelProto:
    """``model`` with QDQ INT8 convs (and every other op onnxruntime quantizes), calibrated on ``feeds``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415

    # quantize_static's own calibration sessions log every initializer they drop at WARNING; dsrewrite's sessions
    # already run at FATAL, so only errors of these reach stderr.
    onnxruntime.set_default_logger_severity(3)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    from .model_io import save_model  # noqa: PLC0415

    model = with_min_opset(model, MIN_OPSET)
    with tempfile.TemporaryDirectory(prefix="dsrewrite-int8-") as tmp, _quiet_root_logger():
        # Handed a path, not the ModelProto: given a proto, quantize_static moves its tensors to external data in place.
        source, path = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        save_model(model, source)
        large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GiB limit, with room for the QDQ nodes
        quantize_static(
            source, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, use_external_data_format=large,
        )  # fmt: skip
        return onnx.load(path)


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
