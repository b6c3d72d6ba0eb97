"""Labelled task evaluations for the benchmark models.

A rewritten model is only as good as the task it still solves, and agreement
with random inputs says little about that.  No labelled data can be downloaded
here, so each evaluation *renders* its own labelled images with Pillow and the
DejaVu fonts, feeds them through the model exactly as the package that ships it
would (same resize, normalisation and channel order) and decodes the output with
the package's own logic (reimplemented: the packages need OpenCV, which we do
not install).

Every set is built from a fixed seed, so scores are reproducible; calibration
feeds come from a different seed so that a rewrite calibrated on them is never
scored on the images it saw.

Public API (``model`` is a path, ``bytes`` or an ``onnx.ModelProto``):

- ``evaluate(name, model, n=None) -> float`` and ``calibration_feeds(name, n, batch_size)``
- ``predict(name, model, n=None) -> Predictions``: the per-sample decisions behind
  the score (decoded strings, classes, or per-pixel masks) and whether each is
  correct; ``agreement(a, b)`` is the share of decisions two models share
- per model: ``predict_<name>(model, n=...) -> Predictions``, ``eval_<name>(model, n=...) -> float``
  (the score of ``predict_<name>``, so the two cannot drift) and
  ``calib_<name>(n=16, batch_size=1) -> list[dict[str, np.ndarray]]``
- ``EVALUATIONS``: name -> ``Evaluation`` (functions, input name, metric text)
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

try:  # importable both as bench.evaluations and from inside bench/
    from .models import fetch
except ImportError:
    from models import fetch

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]
Feed = dict[str, np.ndarray]

EVAL_SEED = 20240601
CALIB_SEED = 77  # must differ from EVAL_SEED: calibration never sees eval images
THREADS = 2


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #

def session(model: ModelLike, threads: int = THREADS) -> ort.InferenceSession:
    """CPU session with a fixed thread count, so timings and results are stable."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, (bytes, bytearray)):
        model = str(model)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _run_batched(sess: ort.InferenceSession, x: np.ndarray, batch: int,
                 reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Run a single-input, first-output model over ``x`` in chunks along axis 0.

    ``reduce`` is applied to each chunk's output before concatenation (e.g. an argmax),
    so large outputs over big sets never sit in memory whole.
    """
    name = sess.get_inputs()[0].name
    reduce = reduce or (lambda y: y)
    return np.concatenate([reduce(sess.run(None, {name: x[i:i + batch]})[0]) for i in range(0, len(x), batch)])


@dataclass(frozen=True)
class Predictions:
    """One model's per-sample decisions on an evaluation set.

    ``decisions``: decoded strings (CTC readers, a tuple), classes (cls, an int array) or
    thresholded masks (det, a bool (N,H,W) array, one decision per pixel). ``correct`` has
    one bool per decision. ``score`` is the task's metric computed from them (accuracy,
    or pooled pixel F1 for det, which is not the mean of ``correct``).
    """

    decisions: Any
    correct: np.ndarray
    score: float


def agreement(a: Predictions, b: Predictions) -> float:
    """Share of samples (pixels for det) whose decision is the same in ``a`` and ``b``."""
    da, db = np.asarray(a.decisions), np.asarray(b.decisions)
    if da.shape != db.shape:
        raise ValueError(f"predictions on different sets: {da.shape} vs {db.shape}")
    return float(np.mean(da == db))


_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts", "/usr/local/share/fonts")


@functools.lru_cache(maxsize=None)
def font_path(file_name: str) -> str:
    """Locate a DejaVu font file (the fonts are a system package, not vendored)."""
    for root in _FONT_DIRS:
        for p in Path(root).rglob(file_name) if Path(root).is_dir() else ():
            return str(p)
    raise FileNotFoundError(f"font {file_name} not found (install fonts-dejavu-core)")


@functools.lru_cache(maxsize=None)
def _font(file_name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(file_name), size)


def _frozen(a: np.ndarray) -> np.ndarray:
    """Cached datasets are shared between calls: make accidental edits fail loudly."""
    a.setflags(write=False)
    return a


def _feeds(x: np.ndarray, input_name: str, batch_size: int) -> list[Feed]:
    """Split ``x`` into writable copies, ``batch_size`` samples per feed."""
    return [{input_name: x[i:i + batch_size].copy()} for i in range(0, len(x), batch_size)]


def greedy_ctc(indices: np.ndarray, blank: int) -> list[list[int]]:
    """Collapse repeats, then drop blanks: the standard greedy CTC decode."""
    out = []
    for row in indices:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != blank
        out.append(row[keep].tolist())
    return out


# --------------------------------------------------------------------------- #
# captcha_crnn (captcha-whisperer 0.1.0)
# --------------------------------------------------------------------------- #
# Package facts (captcha_whisperer/constants.py, preprocess.py, recognizer.py):
# input (N,3,60,160) float32, raw 0..255 values, BGR; output (20,N,37) logits
# over "0-9A-Z" + blank "_" at 36.  Its decoder takes the argmax over classes
# 1..36 only (class 0, the digit "0", is never emitted) and reads only the first
# 19 time steps.  The model never learnt "0" (it reads it as "O") and reads the
# bar-shaped DejaVu "I" as "1"/"L", so the evaluation charset leaves both out.

CAPTCHA_LABELS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_"
CAPTCHA_CHARSET = "123456789ABCDEFGHJKLMNOPQRSTUVWXYZ"
CAPTCHA_INPUT = "image"
_CAPTCHA_FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf",
                  "DejaVuSansMono-Bold.ttf", "DejaVuSansCondensed-Bold.ttf")


def captcha_decode(logits: np.ndarray) -> list[str]:
    """captcha_whisperer.recognizer.decode, texts only; ``logits`` is (T, N, C)."""
    blank = len(CAPTCHA_LABELS) - 1
    texts = []
    for n in range(logits.shape[1]):
        out, prev = [], blank
        for t in range(1, 20):  # TIME_STEPS = 20, steps 0..18
            o = int(np.argmax(logits[t - 1, n, 1:len(CAPTCHA_LABELS)]))
            if o != prev:
                out.append(CAPTCHA_LABELS[o + 1])
            prev = o
        texts.append("".join(out).replace("_", "").strip())
    return texts


def render_captcha(text: str, rng: random.Random) -> Image.Image:
    """A 160x60 captcha: jittered, rotated coloured glyphs, noise lines and dots,
    and a vertical sine warp.  Tuned so the original model scores about 0.9."""
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (160, 60), bg)
    font = _font(rng.choice(_CAPTCHA_FONTS), rng.randint(30, 38))
    widths = [font.getbbox(c)[2] - font.getbbox(c)[0] for c in text]
    gap = rng.randint(-3, 2)
    x = (160 - (sum(widths) + gap * (len(text) - 1))) / 2
    for ch, w in zip(text, widths):
        color = tuple(rng.randint(0, 120) for _ in range(3))
        tile = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
        bb = font.getbbox(ch)
        ImageDraw.Draw(tile).text((30 - (bb[0] + bb[2]) / 2, 30 - (bb[1] + bb[3]) / 2), ch,
                                  font=font, fill=color + (255,))
        tile = tile.rotate(rng.uniform(-20, 20), resample=Image.BICUBIC)
        img.paste(tile, (int(round(x + w / 2 - 30)), int(round(rng.uniform(-6, 6)))), tile)
        x += w + gap
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        d.line([(rng.randint(0, 40), rng.randint(5, 55)), (rng.randint(120, 160), rng.randint(5, 55))],
               fill=tuple(rng.randint(40, 200) for _ in range(3)), width=rng.randint(1, 3))
    for _ in range(rng.randint(30, 150)):
        d.point((rng.randint(0, 159), rng.randint(0, 59)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    a = np.asarray(img)
    amp, phase, period = rng.uniform(0, 3), rng.uniform(0, 2 * math.pi), rng.uniform(40, 90)
    shifts = np.round(amp * np.sin(2 * np.pi * np.arange(160) / period + phase)).astype(int)
    return Image.fromarray(np.stack([np.roll(a[:, c], s, axis=0) for c, s in enumerate(shifts)], axis=1))


def captcha_preprocess(img: Image.Image) -> np.ndarray:
    """captcha_whisperer.preprocess: RGB -> 160x60 bilinear -> BGR float 0..255, CHW."""
    rgb = np.asarray(img.convert("RGB").resize((160, 60), Image.BILINEAR), dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))


@functools.lru_cache(maxsize=4)
def captcha_dataset(n: int, seed: int = EVAL_SEED) -> tuple[np.ndarray, tuple[str, ...]]:
    """``n`` rendered captchas of 4-6 characters: (N,3,60,160) tensor and labels."""
    rng = random.Random(seed)
    labels = tuple("".join(rng.choice(CAPTCHA_CHARSET) for _ in range(rng.randint(4, 6))) for _ in range(n))
    x = np.stack([captcha_preprocess(render_captcha(t, rng)) for t in labels])
    return _frozen(x), labels


def predict_captcha_crnn(model: ModelLike, n: int = 200) -> Predictions:
    """Decoded string per captcha; correct = exact match with the label."""
    x, labels = captcha_dataset(n)
    sess = session(model)
    name = sess.get_inputs()[0].name
    preds: list[str] = []
    for i in range(0, n, 50):  # output is (T, N, C): decode each chunk along axis 1
        preds += captcha_decode(sess.run(None, {name: x[i:i + 50]})[0])
    correct = np.array([p == t for p, t in zip(preds, labels)], dtype=bool)
    return Predictions(tuple(preds), correct, float(np.mean(correct)))


def eval_captcha_crnn(model: ModelLike, n: int = 200) -> float:
    """Exact-match word accuracy of the package's greedy CTC decode."""
    return predict_captcha_crnn(model, n).score


def calib_captcha_crnn(n: int = 16, batch_size: int = 1) -> list[Feed]:
    """Rendered captchas from ``CALIB_SEED``, as feeds for input ``image``."""
    return _feeds(captcha_dataset(n, CALIB_SEED)[0], CAPTCHA_INPUT, batch_size)


# --------------------------------------------------------------------------- #
# PaddleOCR text lines (shared by ppocr_rec and ppocr_cls)
# --------------------------------------------------------------------------- #

_WORDS = (
    "the quick brown fox jumps over lazy dog market window river garden number simple "
    "return value order paper invoice total amount street station coffee summer winter "
    "orange yellow purple silver doctor school letter public office machine travel "
    "history weather morning evening kitchen bottle ticket account balance payment "
    "receipt address phone email center north south east west model sample record "
    "battery camera monitor printer server network system update version report"
).split()
_TEXT_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
               "DejaVuSansCondensed.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf")
# Random codes avoid glyphs that DejaVu draws (nearly) identically in two ways.
_CODE_CHARS = "abdefghjkmnpqrtuyABDEFGHJKLMNPQRTUY23456789"


def random_text(rng: random.Random) -> str:
    """A short printed token without spaces: word, number, price, date or code."""
    kind = rng.choice(("word", "word", "int", "price", "date", "code", "mixed"))
    if kind == "word":
        w = rng.choice(_WORDS)
        style = rng.random()
        return w.upper() if style < 0.25 else w.title() if style < 0.55 else w
    if kind == "int":
        return str(rng.randint(0, 9_999_999))
    if kind == "price":
        return f"{rng.choice(['', '$'])}{rng.randint(1, 9999)}.{rng.randint(0, 99):02d}"
    if kind == "date":
        return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == "code":
        return "".join(rng.choice(_CODE_CHARS) for _ in range(rng.randint(4, 8)))
    return f"{rng.choice(_WORDS)}{rng.randint(1, 99)}"


def render_text_line(text: str, rng: random.Random) -> Image.Image:
    """A cropped text line as a detector would hand it to the recogniser.

    Small fonts (12-24 px, so the 48 px model input is an upscale), random
    colours, slight skew, blur and sensor noise keep the originals off a 100%
    ceiling, so that a degraded rewrite shows up as a lower score.
    """
    font = _font(rng.choice(_TEXT_FONTS), rng.randint(12, 24))
    bb = font.getbbox(text)
    pad_x, pad_y = rng.randint(1, 6), rng.randint(2, 6)
    w, h = bb[2] - bb[0] + 2 * pad_x, bb[3] - bb[1] + 2 * pad_y
    bg = tuple(rng.randint(150, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 100) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((pad_x - bb[0], pad_y - bb[1]), text, font=font, fill=fg)
    img = img.rotate(rng.uniform(-1.5, 1.5), resample=Image.BILINEAR, expand=True, fillcolor=bg)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 12), (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _paddle_norm(img: Image.Image, height: int, max_width: int) -> np.ndarray:
    """rapidocr resize_norm_img: keep aspect to ``height`` (width capped), BGR,
    (x/255-0.5)/0.5, zero-pad on the right to ``max_width``."""
    w, h = img.size
    rw = min(max_width, int(math.ceil(height * w / h)))
    a = np.asarray(img.convert("RGB").resize((rw, height), Image.BILINEAR), dtype=np.float32)
    a = (a[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, max_width), dtype=np.float32)
    out[:, :, :rw] = a
    return out


# --------------------------------------------------------------------------- #
# ppocr_rec (rapidocr-onnxruntime 1.4.4, PP-OCRv4 recogniser)
# --------------------------------------------------------------------------- #
# rec_img_shape [3,48,320]; charset in the model's metadata_props["character"],
# decoded as ["blank"] + lines + [" "] (6625 classes); greedy CTC, blank = 0.

PPOCR_INPUT = "x"
REC_HEIGHT, REC_WIDTH = 48, 320


@functools.lru_cache(maxsize=None)
def ppocr_charset(model_path: str) -> tuple[str, ...]:
    """Class labels as rapidocr builds them from the model's ONNX metadata."""
    meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    return tuple(["blank"] + meta["character"].splitlines() + [" "])


def _reference_charset() -> tuple[str, ...]:
    """The original model's charset (a rewritten model may have lost its metadata)."""
    return ppocr_charset(str(fetch("ppocr_rec")))


@functools.lru_cache(maxsize=4)
def ppocr_rec_dataset(n: int, seed: int = EVAL_SEED) -> tuple[np.ndarray, tuple[str, ...]]:
    """``n`` rendered lines, each 48x320 after rapidocr's preprocessing."""
    rng = random.Random(seed)
    labels = tuple(random_text(rng) for _ in range(n))
    x = np.stack([_paddle_norm(render_text_line(t, rng), REC_HEIGHT, REC_WIDTH) for t in labels])
    return _frozen(x), labels


def predict_ppocr_rec(model: ModelLike, n: int = 200) -> Predictions:
    """Greedy-CTC string per line (surrounding whitespace stripped); correct = exact match."""
    x, labels = ppocr_rec_dataset(n)
    indices = _run_batched(session(model), x, 25, reduce=lambda probs: probs.argmax(-1))
    chars = _reference_charset()
    preds = tuple("".join(chars[i] for i in seq).strip() for seq in greedy_ctc(indices, blank=0))
    correct = np.array([p == t for p, t in zip(preds, labels)], dtype=bool)
    return Predictions(preds, correct, float(np.mean(correct)))


def eval_ppocr_rec(model: ModelLike, n: int = 200) -> float:
    """Exact-match accuracy (surrounding whitespace ignored) of greedy CTC."""
    return predict_ppocr_rec(model, n).score


def calib_ppocr_rec(n: int = 16, batch_size: int = 1) -> list[Feed]:
    return _feeds(ppocr_rec_dataset(n, CALIB_SEED)[0], PPOCR_INPUT, batch_size)


# --------------------------------------------------------------------------- #
# ppocr_cls (rapidocr-onnxruntime 1.4.4, mobile v2.0 orientation classifier)
# --------------------------------------------------------------------------- #
# cls_image_shape [3,48,192], label_list ['0', '180']; output (N,2) softmax.

CLS_HEIGHT, CLS_WIDTH = 48, 192


@functools.lru_cache(maxsize=4)
def ppocr_cls_dataset(n: int, seed: int = EVAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Text lines, every other one (in shuffled order) turned upside down; label 1 = 180."""
    rng = random.Random(seed)
    flips = np.array([i % 2 for i in range(n)])
    rng.shuffle(flips)
    imgs = []
    for f in flips:
        img = render_text_line(random_text(rng), rng)
        imgs.append(_paddle_norm(img.rotate(180) if f else img, CLS_HEIGHT, CLS_WIDTH))
    return _frozen(np.stack(imgs)), _frozen(flips)


def predict_ppocr_cls(model: ModelLike, n: int = 200) -> Predictions:
    """Class per line (0: upright, 1: turned 180 degrees); correct = equals the label."""
    x, y = ppocr_cls_dataset(n)
    classes = _run_batched(session(model), x, 50, reduce=lambda probs: probs.argmax(-1))
    correct = classes == y
    return Predictions(classes, correct, float(np.mean(correct)))


def eval_ppocr_cls(model: ModelLike, n: int = 200) -> float:
    """Accuracy of argmax over {0, 180} degrees."""
    return predict_ppocr_cls(model, n).score


def calib_ppocr_cls(n: int = 16, batch_size: int = 1) -> list[Feed]:
    return _feeds(ppocr_cls_dataset(n, CALIB_SEED)[0], PPOCR_INPUT, batch_size)


# --------------------------------------------------------------------------- #
# ppocr_det (rapidocr-onnxruntime 1.4.4, PP-OCRv4 DB text detector)
# --------------------------------------------------------------------------- #
# rapidocr: limit_type "min", limit_side_len 736, mean = std = 0.5, BGR, thresh
# 0.3 on the (N,1,H,W) probability map.  Images are rendered at 736x736, which
# that resize leaves unchanged.  DB is trained to light up text boxes shrunk by
# offset A(1-r^2)/L with r = 0.4 (boxes are re-grown in post-processing), so the
# ground-truth mask is the ink box of each line shrunk the same way.

DET_SIZE = 736
DET_THRESH = 0.3
DB_SHRINK_RATIO = 0.4


def _db_shrink(box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = w * h * (1 - DB_SHRINK_RATIO ** 2) / (2 * (w + h))
    return x0 + d, y0 + d, x1 - d, y1 - d


def render_det_page(rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    """A page with 4-9 non-overlapping text lines; returns image and target mask.

    A line's box spans its ink horizontally and the font's ascent-to-descent
    band vertically (how text lines are usually annotated), then is DB-shrunk.
    """
    bg = tuple(rng.randint(190, 255) for _ in range(3))
    img = Image.new("RGB", (DET_SIZE, DET_SIZE), bg)
    mask = np.zeros((DET_SIZE, DET_SIZE), dtype=bool)
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(rng.randint(4, 9)):
        text = " ".join(random_text(rng) for _ in range(rng.randint(1, 3)))
        font = _font(rng.choice(_TEXT_FONTS), rng.randint(18, 44))
        bb = font.getbbox(text)
        ascent, descent = font.getmetrics()
        w, h = bb[2] - bb[0], ascent + descent
        if w > DET_SIZE - 20:
            continue
        for _attempt in range(30):
            x, y = rng.randint(10, DET_SIZE - 10 - w), rng.randint(10, DET_SIZE - 10 - h)
            box = (x, y, x + w, y + h)
            if all(box[2] + 12 < t[0] or t[2] + 12 < box[0] or box[3] + 12 < t[1] or t[3] + 12 < box[1]
                   for t in taken):
                break
        else:
            continue
        taken.append(box)
        fg = tuple(rng.randint(0, 90) for _ in range(3))
        ImageDraw.Draw(img).text((x - bb[0], y), text, font=font, fill=fg)
        sx0, sy0, sx1, sy1 = _db_shrink(box)
        mask[int(round(sy0)):int(round(sy1)), int(round(sx0)):int(round(sx1))] = True
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 3)):  # a few distractor strokes
        x0, y0 = rng.randint(0, DET_SIZE - 40), rng.randint(0, DET_SIZE - 40)
        d.rectangle([x0, y0, rng.randint(x0 + 20, DET_SIZE), rng.randint(y0 + 20, DET_SIZE)],
                    outline=tuple(rng.randint(100, 200) for _ in range(3)), width=1)
    return img, mask


def _det_preprocess(img: Image.Image) -> np.ndarray:
    a = np.asarray(img.convert("RGB"), dtype=np.float32)[:, :, ::-1]
    return np.ascontiguousarray(((a / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))


@functools.lru_cache(maxsize=4)
def ppocr_det_dataset(n: int, seed: int = EVAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pages: (N,3,736,736) inputs and (N,736,736) boolean target masks."""
    rng = random.Random(seed)
    pages = [render_det_page(rng) for _ in range(n)]
    x = np.stack([_det_preprocess(p) for p, _ in pages])
    return _frozen(x), _frozen(np.stack([m for _, m in pages]))


def predict_ppocr_det(model: ModelLike, n: int = 32) -> Predictions:
    """Thresholded map (probability > 0.3) per page, one decision per pixel; correct = equals the mask.

    The score is the pixel F1 against the shrunk text-box masks, pooled over all pages.
    """
    x, masks = ppocr_det_dataset(n)
    pred = _run_batched(session(model), x, 4, reduce=lambda prob: prob[:, 0] > DET_THRESH)
    tp = np.logical_and(pred, masks).sum()
    fp = np.logical_and(pred, ~masks).sum()
    fn = np.logical_and(~pred, masks).sum()
    return Predictions(pred, pred == masks, float(2 * tp / max(1, 2 * tp + fp + fn)))


def eval_ppocr_det(model: ModelLike, n: int = 32) -> float:
    """Pixel F1 of (probability > 0.3) against the shrunk text-box mask, pooled over pages."""
    return predict_ppocr_det(model, n).score


def calib_ppocr_det(n: int = 8, batch_size: int = 1) -> list[Feed]:
    return _feeds(ppocr_det_dataset(n, CALIB_SEED)[0], PPOCR_INPUT, batch_size)


# --------------------------------------------------------------------------- #
# yolox_det (ddddocr's click-captcha detector, YOLOX-style): glyphs on clutter
# --------------------------------------------------------------------------- #

YOLOX_SIZE = 416
YOLOX_INPUT = "images"
YOLOX_SCORE, YOLOX_NMS, YOLOX_IOU = 0.1, 0.45, 0.5  # the package's thresholds; a hit is IoU >= 0.5
# Click captchas ask for characters and icons; DejaVu has no CJK, so Latin, Cyrillic and Greek letters and symbols.
_YOLOX_GLYPHS = "ABDEFGHKMNPRSTUVWXYZabdeghkmnpqrtuyЖЯБДФШЩЮλΣΩΦΨ♣♠♥♦★☀☂☎✈♞"
_YOLOX_FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans.ttf")


def render_glyph_scene(rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    """A 416x416 colour field with ring clutter and 3-5 non-overlapping glyphs (28-56 px, turned up to 30
    degrees, random colours); returns the image and the glyphs' ink boxes (x0, y0, x1, y1)."""
    field = Image.fromarray(np.array([[[rng.randrange(256) for _ in range(3)] for _ in range(6)] for _ in range(6)],
                                     dtype=np.uint8))  # fmt: skip
    img = field.resize((YOLOX_SIZE, YOLOX_SIZE), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 7)):  # rings the detector must not take for glyphs
        x, y, r = rng.randrange(YOLOX_SIZE), rng.randrange(YOLOX_SIZE), rng.randint(10, 60)
        draw.ellipse([x, y, x + r, y + r], outline=tuple(rng.randrange(256) for _ in range(3)), width=2)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(rng.randint(3, 5)):
        for _attempt in range(20):
            size = rng.randint(28, 56)
            glyph = Image.new("L", (2 * size, 2 * size), 0)
            ImageDraw.Draw(glyph).text((size // 2, size // 4), rng.choice(_YOLOX_GLYPHS),
                                       font=_font(rng.choice(_YOLOX_FONTS), size), fill=255)  # fmt: skip
            glyph = glyph.rotate(rng.uniform(-30, 30), resample=Image.BICUBIC)
            ink = glyph.getbbox()
            if ink is None:
                continue
            glyph = glyph.crop(ink)
            w, h = glyph.size
            x, y = rng.randint(0, YOLOX_SIZE - w), rng.randint(0, YOLOX_SIZE - h)
            box = (x, y, x + w, y + h)
            if any(not (box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1]) for b in boxes):
                continue
            img.paste(Image.new("RGB", glyph.size, tuple(rng.randrange(256) for _ in range(3))), (x, y), glyph)
            boxes.append(box)
            break
    return img, np.array(boxes, dtype=np.float32).reshape(-1, 4)


@functools.lru_cache(maxsize=2)
def yolox_dataset(n: int, seed: int = EVAL_SEED) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """``n`` scenes as (N,3,416,416) uint8 BGR (the package feeds OpenCV's BGR 0..255 as float, no resize at this
    size; uint8 here keeps 1000 scenes at 0.5 GB), and each scene's glyph boxes."""
    rng = random.Random(seed)
    scenes = [render_glyph_scene(rng) for _ in range(n)]
    x = np.stack([np.asarray(img)[:, :, ::-1].transpose(2, 0, 1) for img, _ in scenes])
    return _frozen(np.ascontiguousarray(x)), tuple(_frozen(boxes) for _, boxes in scenes)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x1, y1 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def yolox_boxes(output: np.ndarray) -> np.ndarray:
    """The package's decoding of one (1, 3549, 6) output: grid offsets and strides 8/16/32, score = objectness x
    class, class-agnostic NMS. Boxes (x0, y0, x1, y1) in input pixels."""
    grids, strides = [], []
    for stride in (8, 16, 32):
        cells = YOLOX_SIZE // stride
        xv, yv = np.meshgrid(np.arange(cells), np.arange(cells))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((cells * cells, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    p = output[0].astype(np.float64)
    centre, size = (p[:, :2] + grid) * stride, np.exp(p[:, 2:4]) * stride
    score = p[:, 4] * p[:, 5]
    keep = score > YOLOX_SCORE
    boxes, score = np.concatenate([centre - size / 2, centre + size / 2], 1)[keep], score[keep]
    order, kept = np.argsort(-score, kind="stable"), []
    while order.size:
        kept.append(order[0])
        order = order[1:][_box_iou(boxes[order[:1]], boxes[order[1:]])[0] <= YOLOX_NMS]
    return boxes[kept]


def _matched(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per ground-truth box: found by a prediction at IoU >= 0.5 (greedy, best overlaps first, one-to-one)."""
    found = np.zeros(len(truth), dtype=bool)
    if len(pred) and len(truth):
        iou = _box_iou(pred, truth)
        for i in np.argsort(-iou.max(1), kind="stable"):
            j = int(np.argmax(np.where(found, -1.0, iou[i])))
            if iou[i, j] >= YOLOX_IOU and not found[j]:
                found[j] = True
    return found


def predict_yolox_det(model: ModelLike, n: int = 200) -> Predictions:
    """One decision per glyph: found or missed; the score is the glyph F1 (false detections count), pooled."""
    x, truths = yolox_dataset(n)
    sess = session(model)
    found, false_hits = [], 0
    for image, truth in zip(x, truths):
        pred = yolox_boxes(sess.run(None, {YOLOX_INPUT: image[None].astype(np.float32)})[0])
        hits = _matched(pred, truth)
        found.append(hits)
        false_hits += len(pred) - int(hits.sum())
    found = np.concatenate(found)
    tp = int(found.sum())
    return Predictions(found, found, float(2 * tp / max(1, 2 * tp + false_hits + (len(found) - tp))))


def eval_yolox_det(model: ModelLike, n: int = 200) -> float:
    """Glyph F1 at IoU 0.5 against the rendered boxes, pooled over scenes."""
    return predict_yolox_det(model, n).score


def calib_yolox_det(n: int = 16, batch_size: int = 1) -> list[Feed]:
    return _feeds(yolox_dataset(n, CALIB_SEED)[0].astype(np.float32), YOLOX_INPUT, batch_size)


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Evaluation:
    """One model's task: how to score it and how to get calibration inputs."""

    evaluate: Callable[..., float]
    calibration: Callable[..., list[Feed]]
    input_name: str
    metric: str
    default_n: int
    predict: Callable[..., Predictions]  # per-sample decisions; ``evaluate`` is its score


EVALUATIONS: dict[str, Evaluation] = {
    "captcha_crnn": Evaluation(eval_captcha_crnn, calib_captcha_crnn, CAPTCHA_INPUT,
                               "exact-match word accuracy (greedy CTC)", 200, predict_captcha_crnn),
    "ppocr_rec": Evaluation(eval_ppocr_rec, calib_ppocr_rec, PPOCR_INPUT,
                            "exact-match line accuracy (greedy CTC)", 200, predict_ppocr_rec),
    "ppocr_cls": Evaluation(eval_ppocr_cls, calib_ppocr_cls, PPOCR_INPUT,
                            "0/180 degree orientation accuracy", 200, predict_ppocr_cls),
    "ppocr_det": Evaluation(eval_ppocr_det, calib_ppocr_det, PPOCR_INPUT,
                            "pixel F1 of thresholded map vs shrunk text boxes", 32, predict_ppocr_det),
    "yolox_det": Evaluation(eval_yolox_det, calib_yolox_det, YOLOX_INPUT,
                            "glyph F1 at IoU 0.5 (one decision per glyph: found or missed)", 200, predict_yolox_det),
}


def evaluate(name: str, model: ModelLike, n: int | None = None) -> float:
    """Score ``model`` on the labelled task registered for ``name``."""
    ev = EVALUATIONS[name]
    return ev.evaluate(model, n=n or ev.default_n)


def predict(name: str, model: ModelLike, n: int | None = None) -> Predictions:
    """Per-sample decisions of ``model`` on the task registered for ``name`` (its score included)."""
    ev = EVALUATIONS[name]
    return ev.predict(model, n=n or ev.default_n)


def calibration_feeds(name: str, n: int = 16, batch_size: int = 1) -> list[Feed]:
    """Inputs for calibrating a rewrite of ``name``; disjoint from the evaluation set."""
    return EVALUATIONS[name].calibration(n=n, batch_size=batch_size)
