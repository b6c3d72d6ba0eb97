"""``python -m dsrewrite``: the same command as ``dsrewrite``."""

from .cli import main

if __name__ == "__main__":
    main()
