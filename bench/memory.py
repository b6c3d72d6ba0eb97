"""Memory and time of dsrewrite itself on a VGG16-sized model.

Builds the 13 convolutions of VGG16 (3x3, 64 to 512 channels, ReLU and max-pooling between stages, 14.7 M
parameters, 59 MB) with seeded random weights, then runs the CLI as a subprocess and reads its peak RSS:

* ``--target-macs 0.5`` (data-free, latency-aware, with a cold latency cache): peak RSS against the model size
  (goal: at most 2x the model plus 1 GB) and wall time;
* ``--rank 1`` (data-free): wall time against the model's own ``onnx.load`` + ``onnx.save`` (goal: at most 3x),
  timed in this process and as a process of its own (the CLI's start-up and imports are in its time).

Both without the whole-model benchmark unless other flags are given (``-- --benchmark``).

Random weights are enough here: memory and time do not depend on the values. Usage:
    python bench/memory.py [--size 224] [--keep DIR] [--python PYTHON] [-- DSREWRITE FLAGS]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_features(size: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x, channels = [], [], "input", 3
    for i, layer in enumerate(VGG16):
        if layer == "M":
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2], name=f"pool{i}"))
            x = f"pool{i}"
            continue
        w = (rng.standard_normal((layer, channels, 3, 3)) * np.sqrt(2 / (9 * channels))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(np.zeros(layer, np.float32), f"B{i}")]
        nodes.append(helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"conv{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        x, channels = f"relu{i}", layer
    graph = helper.make_graph(
        nodes, "vgg16_features", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, size // 32, size // 32])], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run(command: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one subprocess."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:])\n"
        "print(p.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env, check=True)
    code, seconds, rss_kb = done.stdout.split()[-3:]
    if code != "0":
        raise SystemExit(f"dsrewrite failed ({code}): {done.stderr}")
    return float(seconds), int(rss_kb) * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--keep", type=Path, default=None, help="keep the model and outputs in this folder")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs dsrewrite (to compare installs)")
    parser.add_argument("extra", nargs="*", default=["--no-benchmark"], help="more dsrewrite flags (default: --no-benchmark)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dsrewrite-memory-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model_path = folder / "vgg16.onnx"
        onnx.save(vgg16_features(args.size), str(model_path))
        size = model_path.stat().st_size
        start = time.perf_counter()
        onnx.save(onnx.load(str(model_path)), str(folder / "copy.onnx"))
        io_seconds = time.perf_counter() - start
        env = {**os.environ, "XDG_CACHE_HOME": str(folder / "cache")}  # a cold latency cache
        # The same load and save as a process of its own, as the CLI runs: Python's start-up and `import onnx` too.
        copy = f"import onnx; onnx.save(onnx.load({str(model_path)!r}), {str(folder / 'copy.onnx')!r})"
        io_process_seconds = sorted(run([args.python, "-c", copy], env)[0] for _ in range(3))[1]  # the median
        dsrewrite = [args.python, "-m", "dsrewrite", str(model_path), "-q"]
        budget_s, budget_rss = run([*dsrewrite, "-o", str(folder / "half.onnx"), "--target-macs", "0.5", *args.extra], env)
        rank1 = sorted(run([*dsrewrite, "-o", str(folder / "rank1.onnx"), "--rank", "1", "--overwrite", *args.extra], env)
                       for _ in range(3))  # fmt: skip
        rank1_s, rank1_rss = rank1[1]  # the median run
    mb = 2**20
    print(f"model: VGG16 convs at {args.size}x{args.size}, {size / mb:.1f} MB; onnx.load + onnx.save {io_seconds:.2f} s "
          f"in process, {io_process_seconds:.2f} s as a process of its own")  # fmt: skip
    print("| run | wall time | peak RSS | goal |")
    print("|---|---|---|---|")
    print(f"| --target-macs 0.5 (cold latency cache) | {budget_s:.1f} s | {budget_rss / mb:.0f} MB "
          f"({budget_rss / size:.1f}x the model) | <= {(2 * size + 2**30) / mb:.0f} MB |")  # fmt: skip
    print(f"| --rank 1 | {rank1_s:.2f} s ({rank1_s / io_seconds:.1f}x load+save in process, "
          f"{rank1_s / io_process_seconds:.1f}x as a process) | {rank1_rss / mb:.0f} MB | <= 3x load+save |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
