"""The offline verdict: which nodes missed their heartbeats. Pure: the clock is passed in.

A late heartbeat is weak evidence: when the portal itself is slow (CPU load, a long
request, a paused process) every node's heartbeats are late, and nobody missed anything.
So a node's silence is measured against the portal's own progress, not the wall clock:
- only time since the sweep's current unbroken series of runs began counts (a sweep that
  was itself stalled, or a cache that came back empty, starts the count again: missing
  figures mean "unknown", not "missed");
- only up to the freshest heartbeat the portal took from ANY node (if it took none, the
  portal is stalled, and silence counts only beyond `portal_stall_s`, and then only up to
  the last gateway poll its web tier took);
- only since the web tier's current unbroken series of gateway polls began: a paused
  portal (SIGSTOP, a frozen VM) takes no node offline, however long the pause;
- a node with ready replicas gets a longer grace (`ready_grace_s`);
- a node whose replicas a gateway answered from recently is serving, so it is not dead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LivenessLimits:
    missed_s: float  # silence after which a node without ready replicas is offline
    ready_grace_s: float  # the same for a node with ready replicas (their loss costs more)
    sweep_gap_s: float  # a sweep this long after the previous one starts a new series
    portal_stall_s: float  # no heartbeat from any node: silence counts only beyond this
    # A web tier silent this long is not paused but gone (or every gateway is): its last
    # series of polls no longer bounds the silence, which counts again.
    web_tier_forget_s: float = 600.0


@dataclass(frozen=True)
class NodeEvidence:
    node_id: int
    last_heartbeat_s: float | None  # None: unknown (no figures, nothing persisted)
    ready_replicas: int = 0
    last_served_s: float | None = None  # a gateway's last success from one of its replicas


@dataclass(frozen=True)
class SweepClock:
    started_s: float  # when the current unbroken series of sweeps began
    last_s: float  # the latest sweep

    @classmethod
    def from_dict(cls, raw: Any) -> SweepClock | None:
        """Return the clock stored in the cache, or None when absent or unreadable."""
        try:
            return cls(started_s=float(raw["started_s"]), last_s=float(raw["last_s"]))
        except (TypeError, KeyError, ValueError):
            return None


def limits_for(interval_s: float, missed_heartbeats: int) -> LivenessLimits:
    """Return the limits for a heartbeat interval and a number of missed heartbeats."""
    missed_s = interval_s * missed_heartbeats
    return LivenessLimits(missed_s=missed_s, ready_grace_s=3 * missed_s,
                          sweep_gap_s=2 * missed_s, portal_stall_s=max(30.0, 10 * missed_s))


def advance_clock(previous: SweepClock | None, now_s: float,
                  limits: LivenessLimits) -> SweepClock:
    """Return the sweep clock after a run at `now_s` (a new series after a gap)."""
    return advance_series(previous, now_s, limits.sweep_gap_s)


def advance_series(previous: SweepClock | None, now_s: float, gap_s: float) -> SweepClock:
    """Return an unbroken series of events after one at `now_s`: a new series begins after
    a gap of more than `gap_s` either way (a clock that went back that far)."""
    if previous is None or abs(now_s - previous.last_s) > gap_s:
        return SweepClock(started_s=now_s, last_s=now_s)
    # A step back within the gap is a write that landed late (several processes or hosts
    # write the series): it continues it.
    return SweepClock(started_s=min(previous.started_s, now_s),
                      last_s=max(previous.last_s, now_s))


def silence_s(node: NodeEvidence, clock: SweepClock, progress_s: float, now_s: float) -> float:
    """Return how long the portal has demonstrably been taking heartbeats without this node's."""
    seen_s = max(node.last_heartbeat_s or clock.started_s, clock.started_s)
    return min(now_s, progress_s) - seen_s


def portal_progress_s(nodes: Iterable[NodeEvidence], now_s: float, limits: LivenessLimits,
                      gateway_poll_s: float | None = None) -> float:
    """Return up to when the portal was taking heartbeats: the freshest of any node's.

    When no node has been heard for `portal_stall_s`, the portal may be stalled, or every
    node gone. `gateway_poll_s`, the latest gateway poll the portal's web tier took, tells
    them apart: silence counts up to it (the web tier took polls but no heartbeat, so the
    nodes are gone), and no further (after it the web tier took nothing at all: a paused or
    dead portal is not the nodes' fault, and no replacement could reach them anyway).
    Without that figure, time counts again (a dead single-node fleet is declared too).
    """
    freshest = max((n.last_heartbeat_s for n in nodes if n.last_heartbeat_s is not None),
                   default=now_s - limits.portal_stall_s)
    counted_from_s = now_s - limits.portal_stall_s
    if gateway_poll_s is not None:
        counted_from_s = min(counted_from_s, gateway_poll_s)
    return max(freshest, counted_from_s)


def is_missing(node: NodeEvidence, clock: SweepClock, progress_s: float, now_s: float,
               limits: LivenessLimits) -> bool:
    """Return whether the evidence says the node is gone."""
    limit_s = limits.ready_grace_s if node.ready_replicas else limits.missed_s
    if silence_s(node, clock, progress_s, now_s) <= limit_s:
        return False
    # Gateways still get answers from its replicas: the node serves, only its agent is late.
    return node.last_served_s is None or now_s - node.last_served_s > limit_s


def offline_nodes(nodes: list[NodeEvidence], clock: SweepClock, now_s: float,
                  limits: LivenessLimits, web_tier: SweepClock | None = None) -> list[int]:
    """Return the ids of the nodes to declare offline, in the order given.

    `web_tier`: the unbroken series of gateway polls the portal's web tier took, the
    sign that it was up (None: unknown). Silence counts only within it: a web tier that
    was paused took no heartbeat, which is not the nodes' fault, and after it resumes
    each node gets its full grace again.
    """
    if web_tier is not None and now_s - web_tier.last_s > limits.web_tier_forget_s:
        web_tier = None
    if web_tier is not None:
        clock = SweepClock(max(clock.started_s, web_tier.started_s), clock.last_s)
    progress_s = portal_progress_s(nodes, now_s, limits,
                                   web_tier.last_s if web_tier is not None else None)
    return [n.node_id for n in nodes if is_missing(n, clock, progress_s, now_s, limits)]
