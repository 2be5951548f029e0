"""Replica output on the portal: a bounded ring of recent lines per replica, in the cache.

Agents push new lines with their heartbeats (serving/agent/logs.py); the portal never
connects to a worker. Each line gets a sequence number per replica, so readers follow
with `after=<seq>`. The ring keeps the last MAX_RING_LINES lines or MAX_RING_CHARS
characters, whichever is fewer. Only an authenticated agent's own replicas grow it
(`record_agent_lines`). The text is untrusted (a model prints it): it is cleaned again
here (controls escaped, lines cut) and must be escaped wherever it is shown.

The ring's shape in the cache: {"next": <seq of the next line>, "lines": [[seq, at_s,
text], ...]}, plain lists so a code change never meets an old pickled class.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from serving import live
from serving.agent.logs import MAX_BYTES_PER_HEARTBEAT, clean_line
from serving.agent.protocol import MAX_LOG_LINES
from serving.models import Replica

log = logging.getLogger(__name__)
MAX_RING_LINES = 1000
MAX_RING_CHARS = 256 * 1024
DEFAULT_READ_LINES = 100
MAX_READ_LINES = 1000
# What makes a line the replica's "last error" on the replica list: log levels, Python's
# traceback header and exception names.
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL|Traceback|\w*(Error|Exception))\b")

Ring = dict[str, Any]


# --- pure ------------------------------------------------------------------------------

def empty_ring() -> Ring:
    return {"next": 1, "lines": []}


def bounded_batch(texts: list[str]) -> list[str]:
    """Return what the ring takes of one heartbeat's lines: cleaned, within the caps."""
    taken: list[str] = []
    chars = 0
    for text in texts[:MAX_LOG_LINES]:
        line = clean_line(text)
        chars += len(line)
        if chars > MAX_BYTES_PER_HEARTBEAT:
            break
        taken.append(line)
    return taken


def appended(ring: Ring | None, texts: list[str], at_s: float) -> Ring:
    """Return `ring` with `texts` added at `at_s`, the oldest lines dropped past the caps."""
    current = ring if _well_formed(ring) else empty_ring()
    assert current is not None
    seq = int(current["next"])
    lines = list(current["lines"])
    for text in bounded_batch(texts):
        lines.append([seq, at_s, text])
        seq += 1
    lines = lines[-MAX_RING_LINES:]
    chars = sum(len(line[2]) for line in lines)
    while chars > MAX_RING_CHARS:
        chars -= len(lines.pop(0)[2])
    return {"next": seq, "lines": lines}


def last_error(texts: list[str], at_s: float) -> dict[str, Any] | None:
    """Return {"at_s", "text"} of the last line that looks like an error, or None."""
    for text in reversed(bounded_batch(texts)):
        if _ERROR_LINE.search(text):
            return {"at_s": at_s, "text": text}
    return None


def lines_after(ring: Ring | None, after: int | None,
                limit: int) -> tuple[list[dict[str, Any]], int]:
    """Return (lines, cursor): up to `limit` lines after seq `after`, oldest first.

    `after` None: the last `limit` lines. An `after` beyond the newest line means the
    ring started again (the cache lost it): read from its start. Pass the cursor back as
    `after` to follow.
    """
    current = ring if _well_formed(ring) else empty_ring()
    assert current is not None
    lines = current["lines"]
    newest = int(current["next"]) - 1
    if after is None:
        chosen = lines[-limit:] if limit else []
    else:
        start = 0 if after > newest else after
        chosen = [line for line in lines if line[0] > start][:limit]
    cursor = chosen[-1][0] if chosen else (newest if after is None or after > newest
                                           else after)
    return [_shown(line) for line in chosen], cursor


def _shown(line: list[Any]) -> dict[str, Any]:
    seq, at_s, text = line
    at = datetime.fromtimestamp(at_s, UTC).isoformat().replace("+00:00", "Z")
    return {"seq": seq, "at": at, "text": text}


def _well_formed(ring: Any) -> bool:
    return isinstance(ring, dict) and isinstance(ring.get("next"), int) \
        and isinstance(ring.get("lines"), list)


# --- the cache and the database ----------------------------------------------------------

def record_agent_lines(node_id: int, lines_by_replica: Mapping[int, list[str]],
                       at_s: float) -> None:
    """Add an agent's lines to its own replicas' rings; lines for any other are dropped.

    Never raises for a cache outage: the heartbeat itself was applied, and the agent
    does not send the lines again.
    """
    if not lines_by_replica:
        return
    owned = list(Replica.objects.filter(node_id=node_id, pk__in=list(lines_by_replica))
                 .values_list("pk", flat=True))
    if len(owned) < len(lines_by_replica):
        log.info("node %d sent lines for replicas that are not its own: dropped", node_id)
    try:
        rings = live.replica_log_rings(owned)
        new_rings = {pk: appended(rings.get(pk), lines_by_replica[pk], at_s) for pk in owned}
        errors = {pk: error for pk in owned
                  if (error := last_error(lines_by_replica[pk], at_s)) is not None}
        live.store_replica_logs(new_rings, errors)
    except live.CacheUnavailable as exc:
        log.warning("replica lines of node %d lost: %s", node_id, exc)


def read_lines(replica_id: int, after: int | None,
               limit: int = DEFAULT_READ_LINES) -> dict[str, Any]:
    """Return {"lines": [{"seq", "at", "text"}], "next": cursor}; raise CacheUnavailable."""
    ring = live.replica_log_rings([replica_id]).get(replica_id)
    lines, cursor = lines_after(ring, after, limit)
    return {"lines": lines, "next": cursor}


# --- per-replica facts for the replica list ------------------------------------------------

_RUNNING_STATES = ("starting", "ready", "draining")


def facts_of(status: Mapping[str, Any] | None, error: Mapping[str, Any] | None,
             now_s: float) -> dict[str, Any]:
    """Return uptime_s, restarts, in_flight, latency_p50_ms and last_error (None: unknown).

    `status` is the replica's entry in its node's last heartbeat; `error` its last error
    line ({"at_s", "text"}).
    """
    status = status or {}
    started_s = status.get("started_at_s")
    running = status.get("state") in _RUNNING_STATES and isinstance(started_s, int | float)
    return {"uptime_s": round(max(now_s - started_s, 0.0), 1) if running else None,
            "restarts": status.get("restarts"), "in_flight": status.get("in_flight"),
            "latency_p50_ms": status.get("latency_p50_ms"),
            "last_error": error.get("text") if error else None}


def replica_facts(replicas: list[Replica], now_s: float) -> dict[int, dict[str, Any]]:
    """Return {replica id: facts_of(...)} from the cache; {} while the cache is down."""
    try:
        figures = live.nodes_figures(sorted({r.node_id for r in replicas if r.node_id}))
        errors = live.replica_last_errors([r.pk for r in replicas])
    except live.CacheUnavailable as exc:
        log.warning("replica facts unknown: %s", exc)
        return {}
    # Keyed by node too: a node's figures count only for its own replicas.
    reported = {(node_id, status.get("replica_id")): status
                for node_id, figure in figures.items() for status in figure.get("replicas", [])}
    return {r.pk: facts_of(reported.get((r.node_id, r.pk)), errors.get(r.pk), now_s)
            for r in replicas}
