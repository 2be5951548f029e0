"""`swarm nodes ...`: the GPU servers in the pool."""

from __future__ import annotations

from typing import Any

import typer

from swarm_cli import output
from swarm_cli.client import Client, api, fail

NODE_COLUMNS = ["id", "name", "status", "address", "gpus", "cost_per_hour", "last_heartbeat_at"]

nodes_app = typer.Typer(help="GPU servers: list, drain.", no_args_is_help=True)


def _summary(node: dict[str, Any]) -> dict[str, Any]:
    names = [gpu.get("name") or gpu.get("kind") for gpu in node.get("gpus", [])]
    return {**node, "gpus": ", ".join(str(name) for name in names) or "-"}


@nodes_app.command("list")
def list_nodes() -> None:
    """List the GPU servers with their status and GPUs."""
    rows = api().list_all("/api/nodes/")
    output.emit(rows if output.wants_json() else [_summary(row) for row in rows], NODE_COLUMNS)


def node_id(client: Client, node: str) -> int:
    """Return the id of NODE given as an id or a name; exit 2 when there is no such node."""
    if node.isdigit():
        return int(node)
    matches = [row["id"] for row in client.iter_rows("/api/nodes/") if row["name"] == node]
    if not matches:
        fail(f"no node named {node!r}", 2)
    return int(matches[0])


@nodes_app.command("drain")
def drain(node: str) -> None:
    """Stop placing replicas on NODE (a name or id) and move the ones it has."""
    client = api()
    drained = client.post(f"/api/nodes/{node_id(client, node)}/drain/")
    output.emit(drained if output.wants_json() else _summary(drained), NODE_COLUMNS)
