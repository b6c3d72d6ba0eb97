"""No-behaviour-change guard: rewrite every sample and bench model at two commits and compare.

A refactor that means to change nothing is checked by running the dsrewrite CLI
*as of* each commit over the same inputs under the same fixed settings and
comparing exit code, stderr, the written model (sha256) and the JSON report.

Usage:
    python bench/guard.py run REV [--out DIR] [--models NAME,...] [--cache-snapshot FILE]
    python bench/guard.py compare REV_A REV_B [--out DIR] [--out-b DIR_B]
    python bench/guard.py all REV_A REV_B [--out DIR] [--models NAME,...] [--cache-snapshot FILE]

``run`` checks REV out into a temporary ``git worktree``, installs it
(non-editable, ``pip install --no-deps --target DIR/<sha>/site``), checks that
``python -m dsrewrite`` really imports from that site (the venv's editable
install must not win), then runs the CLI once per (model, setting) in a fresh
subprocess and stores ``DIR/<sha>/<model>/<setting>/{out.onnx,report.json,result.json}``.
``compare`` prints one line per (model, setting), ``identical`` or
``DIFFERS: ...``, then ``N identical, M differ``; exit code 0 only if all are
identical, apart from the timed settings (``TIMED_SETTINGS``), whose in-place
timings are profiled afresh on every run: their differences are listed apart. ``--out-b`` reads REV_B's results from another out dir (e.g. a
re-run for the determinism check).

Fixed across revisions (made once per out dir, never per rev):

- inputs: copies of ``sample_models/*.onnx`` and of every ``bench/models.py``
  model, plus one calibration ``.npz`` per model (``np.random.default_rng(0)``,
  16 samples in [0, 1) at the model's guard input shape), all in ``DIR/inputs``;
  every rev therefore sees the same absolute paths;
- the latency cache: ``--rank auto`` and ``--target-macs`` time convs and cache
  the medians. Before every single run ``DIR/xdg`` (``XDG_CACHE_HOME``) is reset
  to hold only the snapshot (default ``DIR/latency-snapshot.json``). Without a
  snapshot, ``run`` first does a warm-up pass over all models and settings with
  one persistent cache (results discarded) and saves that cache as the snapshot.
  A run that still measures something (a cache miss) is flagged in ``compare``:
  its decisions rest on a fresh, noisy timing.

Normalised before comparing: keys named ``seconds`` / ``fit_seconds`` anywhere,
the report's ``benchmark`` section, and paths under the out dir (written as
``<OUT>`` and ``<OUT>/<REV>``). Everything else, floats included, must match exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / ".cache" / "guard"

sys.path.insert(0, str(BENCH_DIR))
from models import MODELS, fetch  # noqa: E402

# CLI flags per setting; "{calib}" is replaced by the model's calibration file. No whole-model benchmark: its
# figures and slowness notes follow the machine's load.
SETTINGS: dict[str, list[str]] = {
    "rank1": ["--rank", "1", "--no-benchmark"],
    "full": ["--rank", "full", "--no-benchmark"],
    "auto": ["--rank", "auto", "--no-benchmark"],
    "macs": ["--target-macs", "0.5", "--no-benchmark"],
    "calib": ["--rank", "2", "--calibration", "{calib}", "--no-benchmark"],
}
# Settings whose decisions rest on timings. Convs timed alone come from the snapshot, but in-place timing (the
# ladders' whole-model profiles and the in-model check) profiles afresh on every run, so these differ between two
# runs of one commit: compare lists their differences apart and leaves them out of the exit code.
TIMED_SETTINGS = {"auto", "macs"}

# The concrete input shape each bench model is rewritten at (passed as --input-shape in every
# setting, so costs are defined). Sizes follow bench/evaluations.py; ppocr_det runs smaller than
# its 736x736 evaluation pages to keep the guard fast. MTCNN is NHWC.
BENCH_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "captcha_crnn": {"image": (1, 3, 60, 160)},
    "ppocr_rec": {"x": (1, 3, 48, 320)},
    "ppocr_det": {"x": (1, 3, 320, 320)},
    "ppocr_cls": {"x": (1, 3, 48, 192)},
    "wakeword_embedding": {"input_1": (1, 76, 32, 1)},
    "mtcnn_pnet": {"input_1": (1, 48, 48, 3)},
    "mtcnn_rnet": {"input_2": (1, 24, 24, 3)},
    "mtcnn_onet": {"input_3": (1, 48, 48, 3)},
    "yolox_det": {"images": (1, 3, 416, 416)},  # fixed in the file
    "yolov8n_320": {"images": (1, 3, 160, 160)},  # dynamic: small, to keep the guard quick
}

CALIB_SAMPLES = 16
CALIB_SEED = 0
TIMED_KEYS = {"seconds", "fit_seconds"}  # run-to-run timings, dropped anywhere in a report
DROPPED_SECTIONS = {"benchmark"}  # whole-model latency measurement
MAX_DIFFS_SHOWN = 4


# -- small helpers ----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_DIR), *args], check=True, capture_output=True, text=True).stdout.strip()


def resolve_rev(rev: str, out: Path | None = None) -> str:
    """Full sha of REV in this repository, or (for compare) a stored result dir it names."""
    try:
        return git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        if out is not None:
            hits = [p.name for p in out.iterdir() if p.is_dir() and len(p.name) == 40 and p.name.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        raise SystemExit(f"error: unknown revision {rev!r}") from None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def short(value: Any, limit: int = 70) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- fixed inputs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardModel:
    name: str
    path: Path  # frozen copy under DIR/inputs
    calib: Path
    shape_args: tuple[str, ...]  # --input-shape flags (bench models only)


def _input_shapes(model_path: Path, fixed: dict[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
    """The shape each graph input is fed at: ``fixed`` for bench models, else the static dims (dynamic -> 1)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise SystemExit(f"error: {model_path.name}: input {vi.name} is not float32; the guard's calibration data is")
        if fixed is None:
            shapes[vi.name] = tuple(d or 1 for d in dims)
        else:
            if vi.name not in fixed:
                raise SystemExit(f"error: {model_path.name}: no guard input shape for input {vi.name!r} (BENCH_SHAPES)")
            want = fixed[vi.name]
            if len(want) != len(dims) or any(d is not None and d != w for d, w in zip(dims, want)):
                raise SystemExit(f"error: {model_path.name}: guard shape {want} does not fit input {vi.name} {dims}")
            shapes[vi.name] = want
    if fixed is not None and set(fixed) - set(shapes):
        raise SystemExit(f"error: {model_path.name}: BENCH_SHAPES names unknown inputs {sorted(set(fixed) - set(shapes))}")
    return shapes


def prepare_inputs(out: Path, names: list[str] | None) -> list[GuardModel]:
    """Freeze the models and calibration files under ``out/inputs`` (once) and describe them."""
    import numpy as np

    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    manifest_path = inputs / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}

    sources: dict[str, tuple[Any, dict | None]] = {}
    for p in sorted((REPO_DIR / "sample_models").glob("*.onnx")):
        sources[p.stem] = (p, None)
    for name in MODELS:
        if name in sources:
            raise SystemExit(f"error: bench model {name} has the same name as a sample model")
        if name not in BENCH_SHAPES:
            raise SystemExit(f"error: bench model {name} has no guard input shape; add it to BENCH_SHAPES")
        sources[name] = (name, BENCH_SHAPES[name])
    selected = names or list(sources)
    unknown = [n for n in selected if n not in sources]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(sources)}")

    models = []
    for name in selected:
        source, fixed = sources[name]
        path, calib = inputs / f"{name}.onnx", inputs / f"{name}.calib.npz"
        entry = manifest.get(name)
        if entry is None or not path.exists() or not calib.exists():
            src = source if isinstance(source, Path) else fetch(source)
            shutil.copyfile(src, path)
            shapes = _input_shapes(path, fixed)
            rng = np.random.default_rng(CALIB_SEED)
            # Samples on axis 0, each of the full input shape (batch included): dsrewrite feeds them one by one.
            arrays = {k: rng.random((CALIB_SAMPLES, *s), dtype=np.float32) for k, s in shapes.items()}
            with open(calib, "wb") as f:
                np.savez(f, **arrays)
            entry = manifest[name] = {
                "source": str(src), "sha256": sha256_file(path), "calib_sha256": sha256_file(calib),
                "shapes": {k: list(v) for k, v in shapes.items()}, "fixed_shape": fixed is not None,
            }
            write_json(manifest_path, manifest)
        else:
            # Frozen copies must not drift; a changed repository copy is only worth a warning.
            if sha256_file(path) != entry["sha256"] or sha256_file(calib) != entry["calib_sha256"]:
                raise SystemExit(f"error: {path} or {calib} changed since it was frozen; delete both to re-freeze")
            if isinstance(source, Path) and sha256_file(source) != entry["sha256"]:
                print(f"warning: {source} differs from the frozen copy {path}; the guard uses the frozen copy")
        shape_args: list[str] = []
        if entry["fixed_shape"]:
            for k, v in entry["shapes"].items():
                shape_args += ["--input-shape", f"{k}:{','.join(map(str, v))}"]
        models.append(GuardModel(name, path, calib, tuple(shape_args)))
    return models


# -- installing a revision --------------------------------------------------------------------


def _can_build_wheels() -> bool:
    """Whether this interpreter's setuptools builds wheels by itself (>= 70.1) or has ``wheel``."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
        return (major, minor) >= (70, 1)
    except Exception:
        return False


def build_env(out: Path) -> dict[str, str]:
    """Environment for ``pip install --no-build-isolation``: adds ``out/buildtools`` when the venv cannot build wheels."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if _can_build_wheels():
        return env
    tools = out / "buildtools"
    if not (tools / "wheel").exists():
        print(f"installing setuptools and wheel into {tools} (this venv cannot build wheels)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(tools),
                        "setuptools>=68", "wheel"], check=True, env=env)  # fmt: skip
    env["PYTHONPATH"] = str(tools)
    return env


def install_rev(sha: str, site: Path, out: Path) -> None:
    """Install dsrewrite as of ``sha`` into ``site`` from a temporary detached worktree."""
    if site.exists():
        shutil.rmtree(site)
    tmp = Path(tempfile.mkdtemp(prefix=f"guard-{sha[:8]}-"))
    worktree = tmp / "src"
    git("worktree", "add", "--detach", "--quiet", str(worktree), sha)
    try:
        # Output only on failure: the build backend's deprecation warnings are noise here.
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
             "--target", str(site), str(worktree)],
            env=build_env(out), cwd=tmp, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"error: pip install of {sha} failed:\n{done.stdout}{done.stderr}")
    finally:
        git("worktree", "remove", "--force", str(worktree))
        shutil.rmtree(tmp, ignore_errors=True)


def run_env(site: Path, xdg: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)
    env["XDG_CACHE_HOME"] = str(xdg)
    return env


# ``-P``: no script dir / cwd on sys.path (a run from inside a checkout would import its sources).
PYTHON = [sys.executable, "-P"]


def check_import(site: Path, xdg: Path, cwd: Path) -> dict:
    """Prove that every dsrewrite module the CLI imports comes from ``site``."""
    probe = (
        "import json, sys, dsrewrite, dsrewrite.cli, dsrewrite.passes\n"
        "files = sorted(m.__file__ for n, m in list(sys.modules.items())"
        " if n.split('.')[0] == 'dsrewrite' and getattr(m, '__file__', None))\n"
        "print(json.dumps({'file': dsrewrite.__file__, 'version': dsrewrite.__version__, 'modules': files}))\n"
    )
    done = subprocess.run([*PYTHON, "-c", probe], env=run_env(site, xdg), cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"error: dsrewrite does not import from {site}:\n{done.stderr}")
    info = json.loads(done.stdout)
    outside = [f for f in info["modules"] if not Path(f).resolve().is_relative_to(site.resolve())]
    if outside or not info["modules"]:
        raise SystemExit(f"error: dsrewrite modules imported from outside {site}: {outside}")
    print(f"dsrewrite {info['version']} imports from {info['file']} ({len(info['modules'])} modules, all under the site)")
    return info


# -- running ----------------------------------------------------------------------------------


class Normaliser:
    """Makes a run's output independent of the out dir and the revision directory."""

    def __init__(self, out: Path, rev_dir: Path):
        # Longest first: the per-rev dir lies inside the out dir.
        self.replacements = [(str(rev_dir), "<OUT>/<REV>"), (str(out), "<OUT>")]

    def text(self, s: str) -> str:
        for old, new in self.replacements:
            s = s.replace(old, new)
        return s

    def report(self, value: Any, top: bool = True) -> Any:
        if isinstance(value, dict):
            return {k: self.report(v, False) for k, v in value.items()
                    if k not in TIMED_KEYS and not (top and k in DROPPED_SECTIONS)}  # fmt: skip
        if isinstance(value, list):
            return [self.report(v, False) for v in value]
        if isinstance(value, str):
            return self.text(value)
        return value


def reset_cache(xdg: Path, snapshot: Path | None) -> set[str]:
    """Empty XDG_CACHE_HOME, then put the snapshot in as the latency cache; return its keys."""
    if xdg.exists():
        shutil.rmtree(xdg)
    (xdg / "dsrewrite").mkdir(parents=True)
    if snapshot is None:
        return set()
    shutil.copyfile(snapshot, xdg / "dsrewrite" / "latency.json")
    return set(json.loads(snapshot.read_text()))


def cache_keys(xdg: Path) -> set[str]:
    path = xdg / "dsrewrite" / "latency.json"
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):
        return set()


def run_one(model: GuardModel, setting: str, run_dir: Path, site: Path, xdg: Path, norm: Normaliser,
            timeout: float) -> dict:  # fmt: skip
    """One CLI run in a fresh subprocess; returns the record that ``compare`` reads."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    out_model, report = run_dir / "out.onnx", run_dir / "report.json"
    flags = [a.replace("{calib}", str(model.calib)) for a in SETTINGS[setting]]
    args = [str(model.path), "-o", str(out_model), "--report", str(report), "-q", *model.shape_args, *flags]
    start = time.perf_counter()
    try:
        done = subprocess.run([*PYTHON, "-m", "dsrewrite", *args], env=run_env(site, xdg), cwd=run_dir,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)  # fmt: skip
        exit_code, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        partial = exc.stderr or ""
        exit_code, stderr = "timeout", partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    seconds = time.perf_counter() - start
    (run_dir / "stderr.txt").write_text(stderr)
    return {
        "model": model.name,
        "setting": setting,
        "args": [norm.text(a) for a in args],
        "exit_code": exit_code,
        "stderr": norm.text(stderr),
        "model_sha256": sha256_file(out_model) if out_model.exists() else "absent",
        "report": norm.report(json.loads(report.read_text())) if report.exists() else "absent",
        "seconds": round(seconds, 2),  # informational, not compared
    }


def _pass(models: list[GuardModel], rev_dir: Path, site: Path, xdg: Path, norm: Normaliser, snapshot: Path | None,
          timeout: float, label: str) -> Iterator[dict]:  # fmt: skip
    total = len(models) * len(SETTINGS)
    i = 0
    for model in models:
        for setting in SETTINGS:
            i += 1
            # Warm-up (snapshot None): one persistent cache across the whole pass, reset once by the caller.
            known = reset_cache(xdg, snapshot) if snapshot is not None else cache_keys(xdg)
            record = run_one(model, setting, rev_dir / model.name / setting, site, xdg, norm, timeout)
            record["new_latency_entries"] = len(cache_keys(xdg) - known)  # fresh timings: informational
            extra = f"  {record['new_latency_entries']} new timing(s)" if record["new_latency_entries"] else ""
            print(f"{label} [{i:3d}/{total}] {model.name:20s} {setting:6s} exit {record['exit_code']}  "
                  f"{record['seconds']:7.1f}s{extra}", flush=True)  # fmt: skip
            yield record


def cmd_run(rev: str, out: Path, names: list[str] | None, snapshot: Path, timeout: float) -> str:
    out.mkdir(parents=True, exist_ok=True)
    sha = resolve_rev(rev)
    rev_dir = out / sha
    rev_dir.mkdir(exist_ok=True)
    site, xdg = rev_dir / "site", out / "xdg"
    models = prepare_inputs(out, names)
    t0 = time.perf_counter()
    print(f"== {rev} = {sha}: installing into {site}", flush=True)
    install_rev(sha, site, out)
    probe = check_import(site, xdg, rev_dir)
    norm = Normaliser(out, rev_dir)

    if not snapshot.exists():
        print(f"== warm-up pass (no latency snapshot at {snapshot}; results discarded)", flush=True)
        warm = rev_dir / "warmup"
        reset_cache(xdg, None)
        for _ in _pass(models, warm, site, xdg, norm, None, timeout, "warm-up"):
            pass
        shutil.rmtree(warm, ignore_errors=True)
        cache = xdg / "dsrewrite" / "latency.json"
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        if cache.exists():
            shutil.copyfile(cache, snapshot)
        else:
            snapshot.write_text("{}")
        print(f"== saved {len(cache_keys(xdg))} latency entries as {snapshot}", flush=True)

    print(f"== real pass, latency cache reset to {snapshot} before every run", flush=True)
    t1 = time.perf_counter()
    records = []
    for record in _pass(models, rev_dir, site, xdg, norm, snapshot, timeout, "run"):
        write_json(rev_dir / record["model"] / record["setting"] / "result.json", record)
        records.append(record)
    end = time.perf_counter()
    import numpy, onnx, onnxruntime  # noqa: E401 (versions for the record)

    write_json(rev_dir / "meta.json", {
        "rev": rev, "sha": sha, "python": sys.version, "numpy": numpy.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "snapshot": str(snapshot), "snapshot_sha256": sha256_file(snapshot),
        "import_check": probe, "models": [m.name for m in models], "settings": SETTINGS,
        "real_pass_seconds": round(end - t1, 1), "total_seconds": round(end - t0, 1),
    })  # fmt: skip
    failed = [r for r in records if r["exit_code"] != 0]
    print(f"== {sha[:12]}: {len(records)} runs in {end - t1:.0f}s (total with install/warm-up {end - t0:.0f}s); "
          f"{len(failed)} with non-zero exit; results in {rev_dir}")  # fmt: skip
    return sha


# -- comparing --------------------------------------------------------------------------------


def json_diffs(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Key paths where ``a`` and ``b`` differ, with both values, in document order."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{k}" if path else k
            if k not in a:
                yield f"{sub}: absent != {short(b[k])}"
            elif k not in b:
                yield f"{sub}: {short(a[k])} != absent"
            else:
                yield from json_diffs(a[k], b[k], sub)
    elif isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from json_diffs(x, y, f"{path}[{i}]")
        if len(a) != len(b):
            yield f"{path}: length {len(a)} != {len(b)}"
    elif a != b or type(a) is not type(b):
        yield f"{path}: {short(a)} != {short(b)}"


def same_up_to_tensor_encoding(path_a: Path, path_b: Path) -> bool:
    """Whether two models hold the same graph and values, whatever field each tensor's data sits in.

    onnx keeps tensor data either as ``raw_data`` or in typed fields (``float_data``, ...); a pass that
    never reads a tensor leaves it as the input had it, one that reads it writes ``raw_data``.
    """
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    def normalised(path: Path) -> bytes:
        model = onnx.load(str(path))

        def fix(tensor) -> None:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))

        def walk(graph) -> None:
            for tensor in graph.initializer:
                fix(tensor)
            for node in graph.node:
                for attr in node.attribute:
                    if attr.HasField("t"):
                        fix(attr.t)
                    for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                        walk(sub)

        walk(model.graph)
        return model.SerializeToString(deterministic=True)

    return normalised(path_a) == normalised(path_b)


def record_diff(a: dict, b: dict, models: tuple[Path, Path] | None = None) -> list[str]:
    parts = []
    if a["args"] != b["args"]:
        parts.append(f"guard CLI args differ: {' '.join(a['args'])} != {' '.join(b['args'])}")
    if a["exit_code"] != b["exit_code"]:
        parts.append(f"exit {a['exit_code']} != {b['exit_code']}")
    if a["stderr"] != b["stderr"]:
        la, lb = a["stderr"].splitlines(), b["stderr"].splitlines()
        first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
        parts.append(f"stderr line {first + 1}: {short(la[first] if first < len(la) else '<end>')} != "
                     f"{short(lb[first] if first < len(lb) else '<end>')}")  # fmt: skip
    if a["model_sha256"] != b["model_sha256"]:
        text = f"out.onnx sha256 {a['model_sha256'][:16]} != {b['model_sha256'][:16]}"
        if models is not None and all(p.exists() for p in models) and same_up_to_tensor_encoding(*models):
            text += " (same graph and values; only the encoding of some tensors differs)"
        parts.append(text)
    diffs = list(json_diffs(a["report"], b["report"]))
    if diffs:
        more = f" (+{len(diffs) - MAX_DIFFS_SHOWN} more)" if len(diffs) > MAX_DIFFS_SHOWN else ""
        parts.append("report " + "; ".join(diffs[:MAX_DIFFS_SHOWN]) + more)
    return parts


def load_results(rev_dir: Path) -> dict[tuple[str, str], dict]:
    results = {}
    for path in sorted(rev_dir.glob("*/*/result.json")):
        record = json.loads(path.read_text())
        results[(record["model"], record["setting"])] = record
    return results


def cmd_compare(rev_a: str, rev_b: str, out: Path, out_b: Path) -> int:
    sha_a, sha_b = resolve_rev(rev_a, out), resolve_rev(rev_b, out_b)
    dir_a, dir_b = out / sha_a, out_b / sha_b
    res_a, res_b = load_results(dir_a), load_results(dir_b)
    if not res_a or not res_b:
        missing = dir_a if not res_a else dir_b
        print(f"error: no results in {missing}; run `guard.py run` first", file=sys.stderr)
        return 2
    print(f"A = {sha_a} ({dir_a})\nB = {sha_b} ({dir_b})")
    meta_a, meta_b = (json.loads(d.joinpath("meta.json").read_text()) if d.joinpath("meta.json").exists() else {}
                      for d in (dir_a, dir_b))  # fmt: skip
    for key in ("snapshot_sha256", "onnxruntime", "onnx", "numpy"):
        if meta_a.get(key) != meta_b.get(key):
            print(f"warning: {key} differs between the runs: {meta_a.get(key)} != {meta_b.get(key)}")
    if out_b != out:  # two out dirs: both must have frozen the same inputs
        manifests = [json.loads(p.read_text()) if p.exists() else {} for p in (out / "inputs" / "manifest.json",
                                                                              out_b / "inputs" / "manifest.json")]
        for name in sorted(set(manifests[0]) & set(manifests[1])):
            a, b = manifests[0][name], manifests[1][name]
            if (a["sha256"], a["calib_sha256"]) != (b["sha256"], b["calib_sha256"]):
                print(f"warning: the frozen input model or calibration file of {name} differs between the out dirs")
    # Run order: models as listed in the runs' meta, settings as in SETTINGS.
    model_rank = {m: i for i, m in enumerate(dict.fromkeys([*meta_a.get("models", []), *meta_b.get("models", [])]))}
    setting_rank = {s: i for i, s in enumerate(SETTINGS)}
    order = sorted(set(res_a) | set(res_b), key=lambda k: (model_rank.get(k[0], len(model_rank)), k[0],
                                                           setting_rank.get(k[1], len(setting_rank)), k[1]))  # fmt: skip
    same = differ = timed = 0
    for key in order:
        label = f"{key[0]:20s} {key[1]:6s}"
        a, b = res_a.get(key), res_b.get(key)
        if a is None or b is None:
            parts = [f"only in {'B' if a is None else 'A'}"]
        else:
            parts = record_diff(a, b, (dir_a / key[0] / key[1] / "out.onnx", dir_b / key[0] / key[1] / "out.onnx"))
        if parts and key[1] in TIMED_SETTINGS and a is not None and b is not None:
            timed += 1
            print(f"{label} differs (timed: fresh in-model profiles): " + " | ".join(parts))
        elif parts:
            differ += 1
            print(f"{label} DIFFERS: " + " | ".join(parts))
        else:
            same += 1
            print(f"{label} identical")
        for side, rec in (("A", a), ("B", b)):
            if rec and rec.get("new_latency_entries"):
                print(f"{'':27s} note: {side} timed {rec['new_latency_entries']} conv form(s) missing from the "
                      "latency snapshot; its decisions may rest on noisy fresh timings")  # fmt: skip
    print(f"{same} identical, {differ} differ" + (f", {timed} timed setting(s) differ (not counted)" if timed else ""))
    return 0 if differ == 0 else 1


# -- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")

    def running(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models", help="comma-separated subset of the models (default: all)")
        p.add_argument("--cache-snapshot", type=Path, help="latency cache snapshot (default OUT/latency-snapshot.json)")
        p.add_argument("--timeout", type=float, default=3600, help="seconds per CLI run (default 3600)")

    p_run = sub.add_parser("run", help="rewrite all models x settings with dsrewrite as of REV")
    p_run.add_argument("rev")
    common(p_run)
    running(p_run)
    p_cmp = sub.add_parser("compare", help="compare stored results of two revisions")
    p_cmp.add_argument("rev_a")
    p_cmp.add_argument("rev_b")
    common(p_cmp)
    p_cmp.add_argument("--out-b", type=Path, help="results directory of REV_B (default: --out)")
    p_all = sub.add_parser("all", help="run REV_A, run REV_B, compare")
    p_all.add_argument("rev_a")
    p_all.add_argument("rev_b")
    common(p_all)
    running(p_all)
    args = parser.parse_args(argv)

    out = args.out.resolve()
    if args.command == "compare":
        return cmd_compare(args.rev_a, args.rev_b, out, (args.out_b or args.out).resolve())
    names = [n for n in args.models.split(",") if n] if args.models else None
    snapshot = (args.cache_snapshot or out / "latency-snapshot.json").resolve()
    if args.command == "run":
        cmd_run(args.rev, out, names, snapshot, args.timeout)
        return 0
    sha_a = cmd_run(args.rev_a, out, names, snapshot, args.timeout)
    sha_b = cmd_run(args.rev_b, out, names, snapshot, args.timeout)
    return cmd_compare(sha_a, sha_b, out, out)


if __name__ == "__main__":
    raise SystemExit(main())
