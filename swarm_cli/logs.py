"""`swarm logs REPLICA`: a replica's recent output; `--follow` polls with a cursor."""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any

import typer

from swarm_cli import output
from swarm_cli.client import Client, api

FOLLOW_PAGE_LINES = 1000  # the API's largest page: a follower catches up page by page
# The portal escapes these already; a terminal is worth a second look (an escape sequence
# from a model's output could rewrite what the operator sees).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe_text(text: str) -> str:
    """Return `text` with control characters escaped (\\x1b), fit for a terminal."""
    return _UNSAFE.sub(lambda match: f"\\x{ord(match.group()):02x}" if ord(match.group())
                       < 0x100 else f"\\u{ord(match.group()):04x}", text)


def _print(lines: list[dict[str, Any]], stream: bool) -> None:
    if output.wants_json() and not stream:
        output.emit(lines)
        return
    for line in lines:
        if output.wants_json():  # JSON Lines: a script reads each line as it comes
            print(json.dumps(line), flush=True)
        else:
            print(safe_text(str(line.get("text", ""))), flush=True)


def _page(client: Client, replica: int, after: int | None, limit: int) -> dict[str, Any]:
    page: dict[str, Any] = client.get(f"/api/replicas/{replica}/logs/", after=after,
                                      limit=limit)
    return page


def logs(
    replica: Annotated[int, typer.Argument(min=1, help="a replica id (see /api/replicas/)")],
    tail: Annotated[int, typer.Option("--tail", "-n", min=1, max=1000,
                                      help="how many recent lines")] = 100,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="keep printing new lines")] = False,
    interval_s: Annotated[float, typer.Option(min=0.2, help="seconds between polls")] = 1.0,
) -> None:
    """Print a replica's recent output (what its agent sent); --follow prints new lines live.

    The portal keeps about the last 1,000 lines (256 KiB) of each replica.
    """
    client = api()
    page = _page(client, replica, None, tail)  # an unknown replica: the portal's 404
    _print(page["lines"], stream=follow)
    cursor = int(page["next"])
    while follow:
        time.sleep(interval_s)  # polling: the REST API has no stream
        page = _page(client, replica, cursor, FOLLOW_PAGE_LINES)
        _print(page["lines"], stream=True)
        cursor = int(page["next"])
