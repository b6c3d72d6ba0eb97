"""Handing freed memory back to the operating system between the large phases of a run.

numpy arrays below glibc's mmap threshold come from the heap, and glibc raises that threshold (up to 32 MB) each
time it frees a larger mapped block, so after a few large arrays most medium ones (patch matrices, factors) are heap
memory too. Freed heap memory stays with the process: after VGG16's error-curve pass, about 0.25 GB of it; after
each onnxruntime session of VGG16, 0.1-0.2 GB more. ``malloc_trim`` returns it (a few ms). Without glibc this does
nothing. A fixed, low mmap threshold (``mallopt``) would return it without calls, but it made a VGG16 fit 50%
slower (every large temporary page-faulted afresh) and would change the allocator of any process that imports us.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Callable, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> None:
    """Return the heap's free pages to the operating system (glibc), so the next phase's peak does not add to them."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def releases_free_memory(function: Callable[P, R]) -> Callable[P, R]:
    """``function``, with the free heap pages handed back before it runs and after it returns or raises: for a
    phase that builds large objects of its own (onnxruntime sessions) and drops them on the way out."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        release_free_memory()
        try:
            return function(*args, **kwargs)
        finally:
            release_free_memory()

    return wrapper
