"""The sizes that decide how a model is loaded, stored and handed to onnxruntime.

The model_io modules read these as ``limits.NAME`` when they run, never through
``from .limits import NAME``: tests lower them so that a small model takes the
code paths of one over 2 GB, and a copied name would not see the change.
"""

# protobuf refuses to serialise a message of 2 GiB or more; keep a margin for
# the graph structure and metadata that surround the tensors.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20
# In a model over EXTERNAL_DATA_THRESHOLD, main-graph initializers at least this
# large that no pass reads stay on disk.
DISK_BACKED_MIN_BYTES = 2**20
# When saving with external data, tensors smaller than this stay in the model file.
INLINE_MAX_BYTES = 1024
# Offsets of large tensors in a written data file are multiples of this (mmap-friendly).
LARGE_TENSOR_ALIGNMENT = 64 * 1024
# Models at least this large in memory reach onnxruntime through a temporary file (see onnxruntime_source).
ORT_VIA_FILE_BYTES = 256 * 2**20
