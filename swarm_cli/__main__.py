"""`python -m swarm_cli`: the same as the `swarm` command."""

from __future__ import annotations

import sys

from swarm_cli.main import app

sys.exit(app())
