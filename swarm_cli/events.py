"""`swarm events`: scaling events; `--follow` polls with a cursor."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from swarm_cli import output
from swarm_cli.client import api

POLL_PAGE_ROWS = 1000  # the API's largest page: more new events than this per poll are rare


def new_events(page: list[dict[str, Any]], after_id: int) -> tuple[list[dict[str, Any]], int]:
    """Return a newest-first page's events with id > after_id (oldest first), and the cursor."""
    fresh = sorted((row for row in page if row["id"] > after_id), key=lambda row: row["id"])
    return fresh, max([after_id, *(row["id"] for row in fresh)])


def event_line(event: dict[str, Any]) -> str:
    """Return one event as a line for people: when, which deployment, the change and why."""
    panic = " (panic)" if event.get("panic") else ""
    return (f"{event['created_at']}  {event['deployment']}  {event['from_replicas']} -> "
            f"{event['to_replicas']}{panic}  {event['reason']}")


def _print(rows: list[dict[str, Any]], stream: bool) -> None:
    if output.wants_json():
        if stream:  # JSON Lines: a script reads each event as it comes
            for row in rows:
                print(json.dumps(row), flush=True)
        else:
            output.emit(rows)
        return
    for row in rows:
        print(event_line(row), flush=True)


def events(
    deployment: Annotated[str | None, typer.Option(help="only this deployment's events")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="how many recent events")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="keep printing new events")] = False,
    interval_s: Annotated[float, typer.Option(min=0.2, help="seconds between polls")] = 1.0,
) -> None:
    """Print the auto-scaler's recent events, oldest first; --follow prints new ones live."""
    client = api()
    page = client.get("/api/scaling-events/", deployment=deployment, limit=limit)["results"]
    rows, cursor = new_events(page, 0)
    _print(rows, stream=follow)
    while follow:
        time.sleep(interval_s)  # polling: the REST API has no event stream
        page = client.get("/api/scaling-events/", deployment=deployment,
                          limit=POLL_PAGE_ROWS)["results"]
        rows, cursor = new_events(page, cursor)
        _print(rows, stream=True)

