"""`swarm deploy ...`: deployments: create, scale, canary split, roll back, delete."""

from __future__ import annotations

from typing import Annotated

import typer

from swarm_cli import output
from swarm_cli.client import api, fail

DEPLOYMENT_COLUMNS = ["name", "model", "version", "alias_name", "traffic", "replicas",
                      "ready_replicas", "device"]
REVISION_COLUMNS = ["number", "reason", "created_by", "created_at"]

deploy_app = typer.Typer(help="Deployments: create, scale, canary, roll back, delete.",
                         no_args_is_help=True)


def _path(name: str, action: str = "") -> str:
    return f"/api/deployments/{name}/" + (f"{action}/" if action else "")


@deploy_app.command("list")
def list_deployments() -> None:
    """List the deployments with their replicas wanted and ready."""
    output.emit(api().list_all("/api/deployments/"), DEPLOYMENT_COLUMNS)


@deploy_app.command("show")
def show(name: str) -> None:
    """Show one deployment and all its settings."""
    output.emit(api().get(_path(name)))


@deploy_app.command("create")
def create(
    name: str,
    model: Annotated[str, typer.Option(help="the registry model to serve")],
    version: Annotated[int | None, typer.Option(help="a version number")] = None,
    alias: Annotated[str, typer.Option(help="follow this alias (rolls over when it moves)")] = "",
    replicas: Annotated[int, typer.Option(min=0)] = 1,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu")] = "auto",
    max_batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    memory_bytes: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Deploy MODEL under NAME: one version (--version N) or an alias it follows (--alias A)."""
    body: dict[str, object] = {"name": name, "model": model, "replicas": replicas,
                               "device": device}
    optional = {"version": version, "alias": alias or None, "max_batch_size": max_batch_size,
                "memory_bytes": memory_bytes}
    body.update({key: value for key, value in optional.items() if value is not None})
    output.emit(api().post("/api/deployments/", body), DEPLOYMENT_COLUMNS)


@deploy_app.command("scale")
def scale(name: str, replicas: Annotated[int, typer.Argument(min=0)],
          pause_policy: Annotated[bool, typer.Option(
              help="pause NAME's auto-scaling policy (refused while it is on)")] = False,
          ) -> None:
    """Set the number of replicas of NAME by hand."""
    body = {"replicas": replicas, "pause_policy": pause_policy}
    output.emit(api().post(_path(name, "scale"), body), DEPLOYMENT_COLUMNS)


def parse_weights(pairs: list[str]) -> dict[str, float]:
    """Return {"version": weight} from VERSION=WEIGHT pairs; exit 1 on a malformed pair."""
    weights: dict[str, float] = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        try:
            if not sep or not version.isdigit():
                raise ValueError(pair)
            weights[version] = float(weight)
        except ValueError:
            fail(f"not VERSION=WEIGHT: {pair!r} (e.g. 1=90 2=10)")
    return weights


@deploy_app.command("canary")
def canary(name: str, weights: Annotated[list[str] | None, typer.Argument(
        help="VERSION=WEIGHT pairs, e.g. 1=90 2=10; none: end the split")] = None) -> None:
    """Split NAME's traffic between versions by weight (a new revision)."""
    body = {"traffic": parse_weights(weights or [])}
    output.emit(api().patch(_path(name), body), DEPLOYMENT_COLUMNS)


@deploy_app.command("revisions")
def revisions(name: str) -> None:
    """List NAME's revisions, newest first."""
    output.emit(api().list_all(_path(name, "revisions")), REVISION_COLUMNS)


@deploy_app.command("rollback")
def rollback(name: str, revision: Annotated[int | None, typer.Option(
        help="the revision to restore; default: the one before the latest")] = None) -> None:
    """Restore an earlier revision of NAME (versions, weights and settings)."""
    client = api()
    if revision is None:
        newest = client.get(_path(name, "revisions"), limit=2).get("results", [])
        if len(newest) < 2:
            fail(f"{name} has no earlier revision to roll back to", 1)
        revision = newest[1]["number"]
    output.emit(client.post(_path(name, "rollback"), {"revision": revision}),
                DEPLOYMENT_COLUMNS)


@deploy_app.command("delete")
def delete(name: str, yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="do not ask for confirmation")] = False) -> None:
    """Delete deployment NAME: its replicas drain and stop."""
    if not yes and not typer.confirm(f"Delete deployment {name}?"):
        fail("not deleted")
    api().delete(_path(name))
    if output.wants_json():
        output.emit({"deleted": name})
    else:
        output.note(f"deleted {name}")
