"""The console entry point, kept light: a Ctrl-C while onnx and onnxruntime load is one error line too.

``dsrewrite.cli`` imports the heavy libraries at module level; importing it
inside this function puts that import under the same interrupt handling as the
run itself.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from .cli import main as run  # noqa: PLC0415 (deliberately late)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    run(argv)
