"""Task sensitivity: error curves measured as the drop of the user's own score.

``evaluate(model) -> float`` (higher is better) scores the model with one conv
at a time replaced by its data-free factors at a few ranks; each conv's error
at a rank becomes the score drop. Scores are cached on disk under a key of the
model bytes and the evaluation's identity, so a second run costs nothing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import lowrank
from .cache import cache_path as user_cache_path
from .cache import read_json, write_json
from .graph import constant_value, convs_by_output, with_dense_kernels
from .plan import LayerPlan

Evaluate = Callable[[onnx.ModelProto], float]


def measure_sensitivity(
    model: onnx.ModelProto,
    plans: Sequence[LayerPlan],
    evaluate: Evaluate,
    *,
    cache_path: Path | None = None,
    cache_key: str = "",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Score the model with one conv at a time rewritten (data-free factors) at a few ranks.

    Sets each eligible conv's ``error_at_rank`` to the score drop (plus a
    vanishing share of its previous estimate, to break ties), ``inf`` for ranks
    not scored. Returns the table ``{"baseline": score, "layers": {output: {rank: score}}}``,
    cached on disk at ``cache_path`` under a key of the model bytes and ``cache_key``.
    """
    fingerprint = hashlib.sha256(model.SerializeToString(deterministic=True) + cache_key.encode()).hexdigest()
    cache = read_json(cache_path)
    table = cache.get(fingerprint) or {"baseline": None, "layers": {}}
    if table["baseline"] is None:
        table["baseline"] = float(evaluate(model))
    convs = convs_by_output(gs.import_onnx(model))
    jobs = [(p, r) for p in plans if p.eligible and p.output in convs for r in p.candidate_ranks()]
    for index, (plan, rank) in enumerate(jobs):
        scores = table["layers"].setdefault(plan.output, {})
        if str(rank) not in scores:
            weight = constant_value(convs[plan.output].inputs[1])
            dense = lowrank.reconstruct(lowrank.factorize(lowrank.channel_spectra(weight, plan.group), rank))
            scores[str(rank)] = float(evaluate(with_dense_kernels(model, {plan.output: (dense, None)}, label="probe")))
            write_json(cache_path, {**cache, fingerprint: table})
        if progress:
            progress("measuring sensitivity", index + 1, len(jobs))
    baseline = table["baseline"]
    for plan in plans:
        scores = table["layers"].get(plan.output)
        if not plan.eligible or not scores:
            continue
        previous = plan.error_at_rank or []
        errors = [float("inf")] * len(previous)
        for rank_text, score in scores.items():
            r = int(rank_text)
            if r <= len(errors):
                errors[r - 1] = max(baseline - score, 0.0) + 1e-6 * previous[r - 1]
        plan.error_at_rank = errors
        plan.error_source = "evaluation"
    return table


def default_cache_path() -> Path:
    return user_cache_path("sensitivity.json")


def load_eval_script(path: str | os.PathLike) -> tuple[Evaluate, str]:
    """``evaluate(model_path) -> float`` from a Python file, wrapped to take a ModelProto; and the file's hash."""
    import importlib.util  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from .errors import InputError  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise InputError(f"eval script not found: {path}")
    source = path.read_bytes()
    spec = importlib.util.spec_from_file_location("dsrewrite_user_eval", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"eval script {path} failed to import: {type(exc).__name__}: {exc}") from None
    user_evaluate = getattr(module, "evaluate", None)
    if not callable(user_evaluate):
        raise InputError(f"eval script {path} must define evaluate(model_path) -> float")

    def evaluate(model: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="dsrewrite-eval-") as tmp:
            model_path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, model_path)
            try:
                score = float(user_evaluate(model_path))
            except Exception as exc:
                raise InputError(f"eval script {path} failed: {type(exc).__name__}: {exc}") from None
        if not np.isfinite(score):
            raise InputError(f"eval script {path} returned a non-finite score: {score}")
        return score

    return evaluate, hashlib.sha256(source).hexdigest()
