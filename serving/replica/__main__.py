"""`python -m serving.replica` / `swarm-replica`: serve one model version over OIP v2."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from serving.replica.config import ConfigError, load_config

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then serve until drained; return the exit code."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"swarm-replica: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Imported here so that a bad command line fails fast, before torch loads.
    from serving.replica.server import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
