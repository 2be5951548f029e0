"""Replica output and per-replica facts on the portal, from the cache.

Agents push new output lines with their heartbeats (serving/agent/logs.py); the portal
never connects to a worker. Each replica's lines go to a bounded ring in the cache
(serving/log_ring.py: about the last 1,000 lines or 256 KiB), numbered so readers follow
with `after=<seq>`. Only an authenticated agent's own replicas grow it
(`record_agent_lines`). The text is untrusted (a model prints it): it is cleaned again
there (controls escaped, lines cut) and must be escaped wherever it is shown.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from serving import live, log_ring
from serving.models import Replica

log = logging.getLogger(__name__)
DEFAULT_READ_LINES = 100
MAX_READ_LINES = 1000


def record_agent_lines(node_id: int, lines_by_replica: Mapping[int, list[str]],
                       at_s: float) -> None:
    """Add an agent's lines to its own replicas' rings; lines for any other are dropped.

    Never raises for a cache outage: the heartbeat itself was applied, and the agent
    does not send the lines again. Four cache round trips for all of a heartbeat's lines.
    """
    if not lines_by_replica:
        return
    owned = list(Replica.objects.filter(node_id=node_id, pk__in=list(lines_by_replica))
                 .values_list("pk", flat=True))
    if len(owned) < len(lines_by_replica):
        log.info("node %d sent lines for replicas that are not its own: dropped", node_id)
    try:
        _append(owned, lines_by_replica, at_s)
    except live.CacheUnavailable as exc:
        log.warning("replica lines of node %d lost: %s", node_id, exc)


def _append(replica_ids: list[int], lines_by_replica: Mapping[int, list[str]],
            at_s: float) -> None:
    indexes = {pk: log_ring.valid_index(index)
               for pk, index in live.replica_log_indexes(replica_ids).items()}
    newest = live.replica_log_chunks([(pk, index["chunks"][-1][0])
                                      for pk, index in indexes.items() if index["chunks"]])
    new_indexes: dict[int, log_ring.Index] = {}
    chunks: dict[tuple[int, int], log_ring.Chunk] = {}
    dropped: list[tuple[int, int]] = []
    errors: dict[int, dict[str, Any]] = {}
    for pk in replica_ids:
        index = indexes.get(pk)
        tail = newest.get((pk, index["chunks"][-1][0])) if index and index["chunks"] else None
        write = log_ring.appended(index, tail, lines_by_replica[pk], at_s)
        new_indexes[pk] = write.index
        chunks.update({(pk, number): lines for number, lines in write.chunks.items()})
        dropped.extend((pk, number) for number in write.dropped)
        if (error := log_ring.last_error(lines_by_replica[pk], at_s)) is not None:
            errors[pk] = error
    live.store_replica_logs(new_indexes, chunks, dropped, errors)


def read_lines(replica_id: int, after: int | None,
               limit: int = DEFAULT_READ_LINES) -> dict[str, Any]:
    """Return {"lines": [{"seq", "at", "text"}], "next": cursor}; raise CacheUnavailable."""
    index = live.replica_log_indexes([replica_id]).get(replica_id)
    numbers = log_ring.chunks_to_read(index, after, limit)
    found = live.replica_log_chunks([(replica_id, number) for number in numbers])
    chunks = {number: lines for (_pk, number), lines in found.items()}
    lines, cursor = log_ring.lines_after(index, chunks, after, limit)
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
    uptime_s = None
    if status.get("state") in _RUNNING_STATES and isinstance(started_s, int | float):
        uptime_s = round(max(now_s - started_s, 0.0), 1)  # clocks apart: never negative
    return {"uptime_s": uptime_s,
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
