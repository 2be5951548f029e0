"""`python -m serving.agent`: the same as `swarm-worker`."""

from __future__ import annotations

from serving.agent.cli import main

main()
