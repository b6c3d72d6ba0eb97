"""SIGINT and SIGTERM: one swap of their handlers, used two ways.

* :func:`signals_raise_interrupted`: while the CLI runs, they raise
  :class:`~dsrewrite.errors.Interrupted`, so every clean-up runs and the exit
  code is ``128 + signal``.
* :func:`deferred_interrupts`: around the few file-system steps that must not be
  cut in half (making or removing temporary files, the renames that put a model
  and its data file in place, see :mod:`dsrewrite.model_io.files`), they are
  held and delivered once the step is done.

Only the standard library and :mod:`dsrewrite.errors`: no onnx, so the command
line's signal handling costs no heavy import.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from .errors import Interrupted


@contextlib.contextmanager
def swapped_signal_handlers(handler, *, keep_ignored: bool):
    """Install ``handler`` for SIGINT and SIGTERM while the block runs; yield the previous handlers.

    Main thread only (elsewhere a no-op yielding ``{}``). Handlers set outside Python
    (``getsignal()`` is None) cannot be restored, so they are left alone; with
    ``keep_ignored`` so are signals the process ignores.
    """
    previous: dict = {}
    if threading.current_thread() is threading.main_thread():
        skip = (signal.SIG_IGN, None) if keep_ignored else (None,)
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                if signal.getsignal(signum) not in skip:
                    previous[signum] = signal.signal(signum, handler)
            except (ValueError, OSError):  # pragma: no cover - not the main interpreter
                pass
    try:
        yield previous
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def signals_raise_interrupted():
    """While the block runs, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only).

    Signals the process ignores stay ignored; the previous handlers come back afterwards.
    """

    def handler(signum, frame):
        raise Interrupted(signum)

    with swapped_signal_handlers(handler, keep_ignored=True):
        yield


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT/SIGTERM until the block ends, then deliver them (main thread only; elsewhere a no-op)."""
    received: list[tuple[int, object]] = []
    previous: dict = {}
    try:
        with swapped_signal_handlers(lambda s, frame: received.append((s, frame)), keep_ignored=False) as previous:
            yield
    finally:
        for signum, frame in received:
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)
