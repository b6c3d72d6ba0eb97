"""On-disk JSON caches (latency measurements, sensitivity tables) under the user's cache directory.

A cache is a convenience: an unreadable one is ignored and an unwritable one
skipped, each with a warning, never an error.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .model_io import atomic_write_text

log = logging.getLogger(__name__)


def cache_path(name: str) -> Path:
    """``$XDG_CACHE_HOME/dsrewrite/<name>`` (default ``~/.cache/dsrewrite/<name>``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsrewrite" / name


def read_json(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable cache %s", path)
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data))
    except OSError as exc:
        log.warning("could not write the cache %s: %s", path, exc)
