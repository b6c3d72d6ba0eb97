"""Loading, validating and atomically saving ONNX models.

Loading never modifies the input file. Saving writes into temporary files in
the destination directory and renames them into place, so a crash or Ctrl-C
never leaves a partial model behind. Models whose serialised size would pass
the protobuf 2 GB limit are saved with their tensors in one external data file
next to the model (``<name>.data``).

One concern per module; callers import from the package:

* :mod:`.load`: load a model file and validate it (file checks, the ONNX
  checker, fields and versions the checker lets through);
* :mod:`.external`: external data, models over 2 GB and their disk-backed
  tensors, saving with a data file, what to hand onnxruntime;
* :mod:`.files`: atomic writes (temp file, fsync, rename) and output-path checks;
* :mod:`.protos`: walking and copying onnx protobuf messages without copying tensor data;
* :mod:`.limits`: the size thresholds above.

The signal handling the atomic writes use lives in :mod:`dsrewrite.signals`.
A test that patches a name must patch the module that looks it up
(``limits.PROTOBUF_LIMIT``, ``external.save_model``): the names re-exported here
are copies, and patching them changes nothing.
"""

from .external import (
    ORT_EXTERNAL_FOLDER_KEY,
    VALUE_READING_OPS,
    has_disk_backed_tensors,
    is_disk_backed,
    onnxruntime_source,
    save_model,
    without_large_tensors,
)
from .files import atomic_write_bytes, atomic_write_text, check_output_path
from .limits import (
    DISK_BACKED_MIN_BYTES,
    EXTERNAL_DATA_THRESHOLD,
    INLINE_MAX_BYTES,
    LARGE_TENSOR_ALIGNMENT,
    ORT_VIA_FILE_BYTES,
    PROTOBUF_LIMIT,
)
from .load import check_model, check_value_types, load_model, run_checker

__all__ = [
    "DISK_BACKED_MIN_BYTES",
    "EXTERNAL_DATA_THRESHOLD",
    "INLINE_MAX_BYTES",
    "LARGE_TENSOR_ALIGNMENT",
    "ORT_EXTERNAL_FOLDER_KEY",
    "ORT_VIA_FILE_BYTES",
    "PROTOBUF_LIMIT",
    "VALUE_READING_OPS",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_model",
    "check_output_path",
    "check_value_types",
    "has_disk_backed_tensors",
    "is_disk_backed",
    "load_model",
    "onnxruntime_source",
    "run_checker",
    "save_model",
    "without_large_tensors",
]
