"""Time and peak memory of sequential distillation on a 50-conv model with 64 calibration samples.

The model is generated here (a plain chain of 3×3 convs + Relu, 64 channels at
32×32 in the first stage and 128 at 16×16 after, with smooth decaying-spectrum
filters), so the benchmark needs no download. Peak memory is the process's
maximum resident set size.

Usage:
    python bench/perf_distill.py [--convs 50] [--samples 64] [--rank 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsrewrite  # noqa: E402


def smooth_kernel(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """Filters with a decaying per-channel spectrum, like trained ones."""
    base = rng.standard_normal((n, m, 3, 3))
    blur = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16
    return ((0.6 * base * blur * 4 + 0.4 * base) * np.sqrt(1.0 / (m * 9))).astype(np.float32)


def chain_model(convs: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, channels = "input", 3
    for i in range(convs):
        out_channels = 64 if i < convs // 2 else 128
        stride = 2 if i == convs // 2 else 1
        w = numpy_helper.from_array(smooth_kernel(rng, out_channels, channels) * np.float32(1.4), f"w{i}")
        b = numpy_helper.from_array(rng.normal(0, 0.01, out_channels).astype(np.float32), f"b{i}")
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [x, w.name, b.name], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1], strides=[stride] * 2))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x, channels = f"r{i}", out_channels
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", channels, None, None])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convs", type=int, default=50)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rank", type=int, default=2)
    args = parser.parse_args(argv)
    model = chain_model(args.convs)
    rng = np.random.default_rng(1)
    coarse = rng.standard_normal((args.samples, 3, 8, 8)).repeat(4, axis=2).repeat(4, axis=3)
    feeds = [{"input": (c + 0.1 * rng.standard_normal(c.shape))[None].astype(np.float32)} for c in coarse]
    start = time.perf_counter()
    result = dsrewrite.rewrite(model, rank=args.rank, calibration=feeds, verify=False)
    elapsed = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    layers = result.report.layers
    print(f"convs rewritten: {sum(layer.rewritten for layer in layers)} of {len(layers)}")
    print(f"sequential distillation, {args.samples} samples, rank {args.rank}: {elapsed:.1f}s wall, peak RSS {peak_mib:.0f} MiB")
    fitted = [layer.output_error for layer in layers if layer.output_error is not None]
    free = [layer.output_error_data_free for layer in layers if layer.output_error_data_free is not None]
    print(f"median layer NMSE: fitted {np.median(fitted):.4f}, data-free {np.median(free):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
