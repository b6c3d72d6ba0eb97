"""Error hierarchy. Each error class maps to a CLI exit code.

The CLI prints ``error: <message>`` on one line and exits with ``exit_code``;
library callers catch :class:`DsrewriteError`. :class:`Interrupted` is what
SIGINT/SIGTERM raise during a CLI run (exit ``128 + signal``); the handlers that
raise it live in :mod:`dsrewrite.signals`.
"""

from __future__ import annotations

import signal


class DsrewriteError(Exception):
    """Base class for every error dsrewrite raises on purpose."""

    exit_code = 2


class UsageError(DsrewriteError):
    """An option value that makes no sense (negative rank, malformed --input-shape, ...)."""


class InputError(DsrewriteError):
    """A model or calibration file that cannot be used."""


class VerificationError(DsrewriteError):
    """The rewritten model does not match the original within the requested tolerance."""

    exit_code = 1

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class PassError(DsrewriteError):
    """A pass broke an invariant. Names the failing pass and the passes that ran before it."""

    def __init__(self, pass_name: str, ran_before: list[str], cause: BaseException):
        before = ", ".join(ran_before) if ran_before else "none"
        super().__init__(
            f"pass '{pass_name}' failed ({type(cause).__name__}: {cause}); passes run before it: {before}"
        )
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        self.__cause__ = cause


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while the CLI ran.

    A ``BaseException`` (like ``KeyboardInterrupt``), so no ``except Exception``
    swallows it on the way out, while ``finally`` blocks and ``except BaseException``
    clean-ups still run. The CLI exits with ``128 + signal number``.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
