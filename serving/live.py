"""The latest heartbeat figures per node and replica, kept in the cache, not the database.

The cache may be down (Redis restarting) or come back empty. Reads and writes here raise
CacheUnavailable for the first, and a missing figure means "unknown", never "missed":
callers decide nothing from an absence alone (see serving.liveness).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from django.core.cache import cache
from django.db import transaction

from serving import liveness

log = logging.getLogger(__name__)
FIGURES_TTL_S = 300
# The gateway's last successful response per replica: evidence that a node whose
# heartbeats are late still serves (written at most once a second per gateway).
REPLICA_SUCCESS_TTL_S = 60
SWEEP_CLOCK_KEY = "sweep:clock"


class CacheUnavailable(RuntimeError):
    """The shared cache did not answer; what it holds is unknown for now."""


def _cache_errors() -> tuple[type[BaseException], ...]:
    try:
        import redis
    except ImportError:  # the embedded default (file cache) has no Redis client
        return (OSError,)
    return (redis.RedisError, OSError)


_CACHE_ERRORS = _cache_errors()


@contextlib.contextmanager
def _guarded(what: str) -> Iterator[None]:
    try:
        yield
    except _CACHE_ERRORS as exc:
        raise CacheUnavailable(f"the cache is unavailable ({what}): {exc}") from exc


def _node_key(node_id: int) -> str:
    return f"node:{node_id}:live"


def record_heartbeat(node_id: int, at_s: float, devices: list[dict[str, Any]],
                     replicas: list[dict[str, Any]]) -> None:
    """Store a heartbeat's figures (overwritten by the next one)."""
    with _guarded("recording a heartbeat"):
        cache.set(_node_key(node_id), {"at_s": at_s, "devices": devices, "replicas": replicas},
                  FIGURES_TTL_S)


def node_figures(node_id: int) -> dict[str, Any] | None:
    """Return the last heartbeat's figures of a node, or None."""
    with _guarded("reading a node's figures"):
        return cache.get(_node_key(node_id))


def nodes_figures(node_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Return the last figures of many nodes in one cache round trip."""
    with _guarded("reading nodes' figures"):
        found = cache.get_many([_node_key(node_id) for node_id in node_ids])
    return {int(key.split(":")[1]): value for key, value in found.items()}


def replica_entries(node_of_replica: dict[int, int]) -> dict[int, dict[str, Any]]:
    """Return {replica id: its entry in its node's last heartbeat} for {replica id: node
    id}, in one cache round trip. A node's figures count only for its own replicas (one
    that moved keeps no figures of its old node)."""
    figures = nodes_figures(sorted(set(node_of_replica.values())))
    return {status["replica_id"]: status
            for node_id, figure in figures.items() for status in figure.get("replicas", [])
            if node_of_replica.get(status.get("replica_id")) == node_id}


def last_heartbeat_s(node_id: int) -> float | None:
    figures = node_figures(node_id)
    return figures["at_s"] if figures else None


def forget(node_id: int) -> None:
    """Drop a node's figures; a cache outage leaves them to expire on their own."""
    try:
        with _guarded("forgetting a node"):
            cache.delete(_node_key(node_id))
    except CacheUnavailable as exc:
        log.warning("%s", exc)


def _success_key(replica_id: int) -> str:
    return f"replica:{replica_id}:ok"


def record_replica_successes(latest_s_by_replica: dict[int, float]) -> None:
    """Record when a gateway last had a successful response from each replica.

    For the gateway: call it at most once a second with the replicas that answered
    successfully since the last call (one cache round trip). Never raises.
    """
    if not latest_s_by_replica:
        return
    try:
        with _guarded("recording replica successes"):
            cache.set_many({_success_key(pk): at_s for pk, at_s in latest_s_by_replica.items()},
                           REPLICA_SUCCESS_TTL_S)
    except CacheUnavailable as exc:
        log.warning("%s", exc)


def replica_successes(replica_ids: list[int]) -> dict[int, float]:
    """Return {replica id: last successful response seen by a gateway, epoch seconds}."""
    with _guarded("reading replica successes"):
        found = cache.get_many([_success_key(pk) for pk in replica_ids])
    return {int(key.split(":")[1]): float(value) for key, value in found.items()}


def sweep_clock() -> dict[str, float] | None:
    """Return the offline sweep's clock ({"started_s", "last_s"}), None when absent."""
    with _guarded("reading the sweep clock"):
        return cache.get(SWEEP_CLOCK_KEY)


def set_sweep_clock(clock: dict[str, float]) -> None:
    with _guarded("writing the sweep clock"):
        cache.set(SWEEP_CLOCK_KEY, clock, FIGURES_TTL_S)


ROUTES_REVISION_KEY = "routes:revision"


def bump_routes() -> None:
    """Tell every gateway (any process) that its routing table is stale.

    A cache outage is logged, not raised: this runs after commit, and the gateways'
    periodic full reload picks the change up anyway.
    """
    try:
        with _guarded("bumping the routes revision"):
            cache.set(ROUTES_REVISION_KEY, time.time_ns(), None)
    except CacheUnavailable as exc:
        log.warning("%s", exc)


def bump_routes_on_commit() -> None:
    """Bump once the current transaction commits (the new rows are visible by then)."""
    transaction.on_commit(bump_routes)


def routes_revision() -> str:
    """Return the routes revision ("0" when the cache lost it); raise CacheUnavailable."""
    with _guarded("reading the routes revision"):
        return str(cache.get(ROUTES_REVISION_KEY, 0))


# Gateway processes that polled the routing table lately: the portal splits each
# deployment's per-replica cap over them. One key per instance (its last poll, wall-clock
# seconds) plus one list of the instances known, rewritten only when one joins or every
# GATEWAY_RELIST_S, so concurrent polls from different gateways rarely write the same key.
GATEWAYS_KEY = "gateways:known"
# The unbroken series of polls any portal process took from any gateway ({started_s,
# last_s}): the web tier's sign of life, which the offline sweep reads
# (serving/liveness.py: a paused portal takes no node offline). Gateways poll every 0.2 s
# and each process writes an instance's poll about once a second: a longer gap than
# WEB_TIER_GAP_S means the web tier was away.
WEB_TIER_KEY = "gateways:polls-taken"
WEB_TIER_GAP_S = 5.0
GATEWAY_LIVE_WINDOW_S = 3.0
GATEWAY_WRITE_EVERY_S = 1.0
GATEWAY_RELIST_S = 30.0
MAX_GATEWAY_INSTANCES = 1000


def _gateway_key(instance: str) -> str:
    return f"gateway:{instance}:polled"


class GatewayInstances:
    """Counts gateway instances that polled within GATEWAY_LIVE_WINDOW_S (wall clock, s).

    Each portal process writes an instance's poll at most once per GATEWAY_WRITE_EVERY_S.
    Only authenticated callers may be noted: instance ids are client-chosen.
    """

    def __init__(self) -> None:
        self._written_s: dict[str, float] = {}  # this process's last write per instance

    def note(self, instance: str, now_s: float) -> bool:
        """Record a poll by `instance`; return whether the cache was written."""
        last_s = self._written_s.get(instance)
        if last_s is not None and 0 <= now_s - last_s < GATEWAY_WRITE_EVERY_S:
            return False
        with _guarded("recording a gateway poll"):
            cache.set(_gateway_key(instance), now_s, GATEWAY_RELIST_S)
            series = liveness.SweepClock.from_dict(cache.get(WEB_TIER_KEY))
            series = liveness.advance_series(series, now_s, WEB_TIER_GAP_S)
            cache.set(WEB_TIER_KEY, asdict(series), None)
            known: dict[str, float] = cache.get(GATEWAYS_KEY) or {}
            listed_s = known.get(instance)
            if listed_s is None or now_s - listed_s >= GATEWAY_RELIST_S:
                cache.set(GATEWAYS_KEY, _relisted(known, instance, now_s), None)
        if len(self._written_s) >= MAX_GATEWAY_INSTANCES:
            self._written_s.clear()  # bounded; costs one extra write per instance
        self._written_s[instance] = now_s
        return True

    def count(self, now_s: float) -> int:
        """Return how many instances polled within the window (0 when none)."""
        with _guarded("counting gateways"):
            known: dict[str, float] = cache.get(GATEWAYS_KEY) or {}
            polled = cache.get_many([_gateway_key(instance) for instance in known])
        return sum(1 for at_s in polled.values() if now_s - float(at_s) <= GATEWAY_LIVE_WINDOW_S)


def web_tier_series() -> liveness.SweepClock | None:
    """Return the unbroken series of gateway polls the web tier took (wall clock, s;
    None: none recorded)."""
    with _guarded("reading the web tier's gateway polls"):
        return liveness.SweepClock.from_dict(cache.get(WEB_TIER_KEY))


def _relisted(known: dict[str, float], instance: str, now_s: float) -> dict[str, float]:
    """Return the known list with `instance` listed now and long-silent ones dropped."""
    kept = {i: at_s for i, at_s in known.items() if now_s - at_s < 2 * GATEWAY_RELIST_S}
    kept[instance] = now_s
    newest = sorted(kept.items(), key=lambda item: item[1])[-MAX_GATEWAY_INSTANCES:]
    return dict(newest)


# Replica output (serving/replica_logs.py, serving/log_ring.py): per replica an index and
# a few chunks of lines, and its last error line apart, so a list of replicas reads a few
# bytes each rather than whole rings.
REPLICA_LOGS_TTL_S = 24 * 3600  # a failed replica's last words stay readable for a day


def _logs_key(replica_id: int) -> str:
    return f"replica:{replica_id}:logs"


def _chunk_key(replica_id: int, number: int) -> str:
    return f"replica:{replica_id}:logs:{number}"


def _last_error_key(replica_id: int) -> str:
    return f"replica:{replica_id}:last-error"


def replica_log_indexes(replica_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Return {replica id: its log ring's index} for those that have one (one round trip)."""
    with _guarded("reading replica logs"):
        found = cache.get_many([_logs_key(pk) for pk in replica_ids])
    return {int(key.split(":")[1]): value for key, value in found.items()}


def replica_log_chunks(wanted: list[tuple[int, int]]) -> dict[tuple[int, int], list[Any]]:
    """Return {(replica id, chunk number): its lines} of the chunks still cached."""
    keys = {_chunk_key(pk, number): (pk, number) for pk, number in wanted}
    with _guarded("reading replica logs"):
        found = cache.get_many(list(keys))
    return {keys[key]: value for key, value in found.items()}


def store_replica_logs(indexes: dict[int, dict[str, Any]],
                       chunks: dict[tuple[int, int], list[Any]],
                       dropped: list[tuple[int, int]],
                       last_errors: dict[int, dict[str, Any]]) -> None:
    """Write ring indexes, changed chunks and last error lines; delete dropped chunks."""
    values: dict[str, Any] = {_chunk_key(pk, n): lines for (pk, n), lines in chunks.items()}
    values.update({_last_error_key(pk): error for pk, error in last_errors.items()})
    # The index last: a reader never meets an index that names a chunk not written yet.
    values.update({_logs_key(pk): index for pk, index in indexes.items()})
    with _guarded("recording replica logs"):
        cache.set_many(values, REPLICA_LOGS_TTL_S)
        if dropped:
            cache.delete_many([_chunk_key(pk, n) for pk, n in dropped])


def replica_last_errors(replica_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Return {replica id: {"at_s", "text"}} of the last error line each printed."""
    with _guarded("reading replica errors"):
        found = cache.get_many([_last_error_key(pk) for pk in replica_ids])
    return {int(key.split(":")[1]): value for key, value in found.items()}
