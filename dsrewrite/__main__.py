"""``python -m dsrewrite``: the same command as ``dsrewrite``."""

from .entry import main

if __name__ == "__main__":
    main()
