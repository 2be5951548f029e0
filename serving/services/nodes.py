"""Join tokens, node registration, heartbeats, the offline sweep, drain and removal."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from serving import live, liveness, node_ca, secrets
from serving.models import Gpu, JoinToken, Node, NodeStatus, Replica, ReplicaState
from serving.services import node_certs
from serving.services.reconcile import desired_for_node, reconcile_deployments_of
from swarm_portal import live_events, stopping
from swarm_portal.errors import ServiceError
from swarm_portal.live_events import NodeFigures, NodeStatusChanged, ReplicasChanged
from swarm_protocol.addresses import IN_PROCESS_SUFFIX, is_in_process_host
from swarm_protocol.agent_messages import (
    GENERATION_FIELDS,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
    ReplicaStatus,
)

log = logging.getLogger(__name__)
LAST_HEARTBEAT_PERSIST_S = 10.0
AGENT_STATES = {state.value for state in ReplicaState}


class Unauthorized(ServiceError):
    status_code = 401


class CacheDown(ServiceError):
    """The shared cache is down: the agent retries after a moment (its figures are not lost)."""

    status_code = 503
    headers = {"Retry-After": "2"}


def do_create_join_token(*, name: str, user: Any, expires_in: timedelta | None,
                         uses: int | None) -> tuple[JoinToken, str]:
    """Create a join token; return it and its secret (shown once, stored as a digest)."""
    secret = secrets.new_join_token()
    token = JoinToken.objects.create(
        name=name, token_hash=secrets.digest(secret), prefix=secret[:10], created_by=user,
        expires_at=timezone.now() + expires_in if expires_in else None, uses_left=uses)
    return token, secret


def do_revoke_join_token(token: JoinToken) -> None:
    JoinToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now())


def _claim_join_token(secret: str, now: datetime) -> JoinToken:
    """Use one use of a valid join token (a conditional update: two joins never share it)."""
    usable = (Q(token_hash=secrets.digest(secret), revoked_at__isnull=True)
              & (Q(expires_at__isnull=True) | Q(expires_at__gt=now)))
    token = JoinToken.objects.filter(usable).first()
    if token is None:
        raise Unauthorized("the join token is unknown, expired or revoked")
    if token.uses_left is not None:
        claimed = JoinToken.objects.filter(pk=token.pk, uses_left__gt=0).update(
            uses_left=F("uses_left") - 1)
        if not claimed:
            raise Unauthorized("the join token has no uses left")
    return token


@transaction.atomic
def do_register_node(message: RegisterRequest, now: datetime | None = None,
                     reach_mode: str = "direct") -> RegisterResponse:
    """Admit a node that shows a valid join token; return its id, secrets and certificate.
    `reach_mode` (the probe's finding) is stored in the same insert: no reader ever sees a
    tunnel node as direct."""
    now = now or timezone.now()
    if is_in_process_host(message.address):  # a gateway's name for a tunnel node's replicas
        raise ServiceError(f"address: a name under {IN_PROCESS_SUFFIX} is not an address")
    token = _claim_join_token(message.join_token, now)
    csr = node_certs.certificate_request(message)  # refused: the transaction gives the use back
    node = Node.objects.create(
        name=message.name[:100], address=message.address[:255], labels=message.labels,
        cost_per_hour=max(0.0, message.cost_per_hour), agent_version=message.agent_version[:50],
        secret_hash="", join_token=token, last_heartbeat_at=now, reach_mode=reach_mode)
    secret = secrets.new_node_secret(node.pk)
    node.secret_hash = secrets.digest(secret)
    node.save(update_fields=["secret_hash"])
    issued = node_certs.issue_certificate(node, csr, now)
    _sync_devices(node, [asdict(d) for d in message.devices])
    with contextlib.suppress(live.CacheUnavailable):  # unknown figures: the next heartbeat's
        live.record_heartbeat(node.pk, now.timestamp(), [asdict(d) for d in message.devices],
                              [])
    live_events.publish(NodeStatusChanged(node.pk))
    log.info("node %s (#%s) joined with token %s", node.name, node.pk, token.prefix)
    return RegisterResponse(node_id=node.pk, node_secret=secret,
                            replica_key=secrets.replica_key(node.pk),
                            heartbeat_interval_s=settings.HEARTBEAT_INTERVAL_S,
                            certificate_pem=issued.certificate_pem if issued else "",
                            ca_certificate_pem=node_ca.ca_certificate_pem() if issued else "")


def authenticate_node(authorization: str) -> Node:
    """Return the node whose secret is in an `Authorization: Bearer` header, or raise 401."""
    secret = secrets.bearer_secret(authorization)
    node_id = secrets.node_id_from_secret(secret) if secret else None
    node = Node.objects.filter(pk=node_id).first() if node_id else None
    if node is None or secret is None or not secrets.matches(secret, node.secret_hash):
        raise Unauthorized("a valid node secret is required (Authorization: Bearer swn_...)")
    return node


def _sync_devices(node: Node, devices: list[dict[str, Any]]) -> None:
    """Keep the Gpu rows equal to the reported inventory (rarely changes)."""
    current = {(g.index, g.uuid, g.name, g.kind, g.memory_total_bytes) for g in node.gpus.all()}
    reported = {(d["index"], d["uuid"], d["name"], d["kind"], d["memory_total_bytes"])
                for d in devices}
    if current == reported:
        return
    node.gpus.all().delete()
    Gpu.objects.bulk_create([
        Gpu(node=node, index=i, uuid=u, name=n, kind=k, memory_total_bytes=m)
        for i, u, n, k, m in sorted(reported)])


def do_heartbeat(node: Node, message: HeartbeatRequest,
                 now: datetime | None = None) -> HeartbeatResponse:
    """Take a node's figures; persist only changes; answer with the replicas it should run."""
    now = now or timezone.now()
    devices = [asdict(d) for d in message.devices]
    replicas = [_live_figures(r) for r in message.replicas]
    try:
        live.record_heartbeat(node.pk, now.timestamp(), devices, replicas)
    except live.CacheUnavailable as exc:
        raise CacheDown("the portal's cache is unavailable; retry the heartbeat") from exc
    live_events.publish(NodeFigures(node.pk, now.timestamp(), devices, replicas))
    with transaction.atomic():
        node = Node.objects.select_for_update().filter(pk=node.pk).first()
        if node is None:  # removed while this heartbeat was on its way
            raise Unauthorized("this node was removed; its secret is no longer valid")
        came_back = _persist_node_changes(node, message, now)
        _sync_devices(node, devices)
        changed = _apply_replica_statuses(node, message.replicas, now)
        if came_back:
            # Its ready replicas were kept while it was away: reconcile scales back the
            # replacements started meanwhile (the ones not ready go first).
            changed |= set(node.replicas.filter(desired=True).values_list(
                "deployment_id", flat=True))
        if changed:
            live.bump_routes_on_commit()
    if changed:
        if _may_place():
            reconcile_deployments_of(changed, now)
        live_events.publish(ReplicasChanged(tuple(changed)))
    return HeartbeatResponse(desired=desired_for_node(node), replica_key=secrets.replica_key(
        node.pk), heartbeat_interval_s=settings.HEARTBEAT_INTERVAL_S, node_status=node.status,
        certificate_pem=node_certs.renewed_certificate(node, message.csr_pem, now))


def _live_figures(status: ReplicaStatus) -> dict[str, Any]:
    """Return a replica's figures for the cache and the pages: generation figures only
    where given (most replicas are not generative; nine nulls each would ride along in
    every heartbeat's cache entry and live message)."""
    figures = asdict(status)
    for name in GENERATION_FIELDS:
        if figures[name] is None:
            del figures[name]
    return figures


def _persist_node_changes(node: Node, message: HeartbeatRequest, now: datetime) -> bool:
    """Write the node's changes (update, not save: no error if the row just went); say if
    it came back from offline."""
    fields: dict[str, Any] = {}
    came_back = node.status == NodeStatus.OFFLINE
    if came_back:
        fields.update(status=NodeStatus.READY, status_changed_at=now)
        log.info("node %s (#%s) is back", node.name, node.pk)
        live_events.publish(NodeStatusChanged(node.pk))
    stale = (node.last_heartbeat_at is None
             or (now - node.last_heartbeat_at).total_seconds() >= LAST_HEARTBEAT_PERSIST_S)
    if stale or fields:
        fields["last_heartbeat_at"] = now
    cached = sorted(set(message.cached_artifacts))
    if cached != node.cached_artifacts:
        fields["cached_artifacts"] = cached
    if fields:
        Node.objects.filter(pk=node.pk).update(**fields)
        for name, value in fields.items():
            setattr(node, name, value)
    return came_back


def _apply_replica_statuses(node: Node, statuses: list[ReplicaStatus],
                            now: datetime) -> set[int]:
    """Write replica state changes; return the ids of deployments that need a reconcile.

    Writes are conditional updates: a replica deleted meanwhile (its deployment being
    deleted) is skipped, not an error.
    """
    reported = {status.replica_id: status for status in statuses}
    changed: set[int] = set()
    for replica in node.replicas.exclude(state=ReplicaState.STOPPED):
        status = reported.get(replica.pk)
        new_state = _next_state(replica, status)
        port = status.port if status else replica.port
        error = (status.error if status else replica.error)[:2000]
        if (new_state, port, error) == (replica.state, replica.port, replica.error):
            continue
        updates: dict[str, Any] = {"state": new_state, "port": port, "error": error}
        if new_state != replica.state:
            updates["state_changed_at"] = now
            if new_state == ReplicaState.READY:
                updates["ready_at"] = now
        if Replica.objects.filter(pk=replica.pk).update(**updates) and (
                new_state != replica.state):
            changed.add(replica.deployment_id)
    return changed


def _next_state(replica: Replica, status: ReplicaStatus | None) -> str:
    if status is None:
        # Not (or no longer) running there: done if we asked it to go, else not started yet.
        return ReplicaState.STOPPED if not replica.desired else replica.state
    if status.state not in AGENT_STATES:
        return replica.state
    if not replica.desired and status.state in (ReplicaState.STARTING, ReplicaState.READY):
        return ReplicaState.DRAINING
    return status.state


def liveness_limits() -> liveness.LivenessLimits:
    return liveness.limits_for(settings.HEARTBEAT_INTERVAL_S,
                               settings.MISSED_HEARTBEATS_OFFLINE)


def sweep_nodes(now: datetime | None = None) -> list[int]:
    """Mark nodes offline when the evidence says they are gone; return their ids.

    A cache outage skips the sweep: missing figures are unknown, not missed.
    """
    now = now or timezone.now()
    limits = liveness_limits()
    try:
        evidence, clock = _sweep_evidence(now.timestamp(), limits)
        web_tier = live.web_tier_series()
    except live.CacheUnavailable as exc:
        log.warning("offline sweep skipped: %s", exc)
        return []
    verdicts = liveness.offline_nodes(evidence, clock, now.timestamp(), limits, web_tier)
    return [pk for pk in verdicts if _mark_offline(pk, now)]


def _sweep_evidence(now_s: float, limits: liveness.LivenessLimits,
                    ) -> tuple[list[liveness.NodeEvidence], liveness.SweepClock]:
    """Read what the verdict needs: two queries and four cache round trips."""
    candidates = list(Node.objects.exclude(status=NodeStatus.OFFLINE)
                      .values_list("pk", "last_heartbeat_at"))
    ready = list(Replica.objects.filter(state=ReplicaState.READY, desired=True,
                                        node__isnull=False)
                 .exclude(node__status=NodeStatus.OFFLINE).values_list("node_id", "pk"))
    figures = live.nodes_figures([pk for pk, _ in candidates])
    served = live.replica_successes([pk for _, pk in ready])
    clock = liveness.advance_clock(liveness.SweepClock.from_dict(live.sweep_clock()), now_s,
                                   limits)
    live.set_sweep_clock(asdict(clock))
    ready_by_node: dict[int, list[int]] = {}
    for node_id, replica_id in ready:
        ready_by_node.setdefault(node_id, []).append(replica_id)
    evidence = []
    for pk, persisted_at in candidates:
        replicas = ready_by_node.get(pk, [])
        served_s = max((served[r] for r in replicas if r in served), default=None)
        heard_s = figures.get(pk, {}).get("at_s") or (
            persisted_at.timestamp() if persisted_at else None)
        evidence.append(liveness.NodeEvidence(pk, heard_s, len(replicas), served_s))
    return evidence, clock


def _mark_offline(node_id: int, now: datetime) -> bool:
    """Declare a node offline. Make before break: its ready replicas keep serving (and stay
    in the routing table) until reconcile has their replacements ready elsewhere."""
    with transaction.atomic():
        claimed = Node.objects.filter(pk=node_id).exclude(status=NodeStatus.OFFLINE).update(
            status=NodeStatus.OFFLINE, status_changed_at=now)
        if not claimed:
            return False  # another sweeper got there first
        serving = Q(node_id=node_id, state=ReplicaState.READY, desired=True)
        deployments = _release_replicas(Q(node_id=node_id) & ~serving, now,
                                        "node missed its heartbeats")
        deployments |= set(Replica.objects.filter(serving).values_list("deployment_id",
                                                                        flat=True))
        live.bump_routes_on_commit()
    log.warning("node #%s is offline: missed heartbeats; replacing its replicas (ready ones "
                "serve until their replacements are ready)", node_id)
    reconcile_deployments_of(deployments, now)
    live_events.publish(NodeStatusChanged(node_id))
    live_events.publish(ReplicasChanged(tuple(deployments)))
    return True


def _release_replicas(where: Q, now: datetime, reason: str) -> set[int]:
    """Give up the matching live replicas (they will be replaced elsewhere)."""
    replicas = Replica.objects.filter(where).exclude(
        state__in=[ReplicaState.FAILED, ReplicaState.STOPPED])
    deployments = set(replicas.values_list("deployment_id", flat=True))
    replicas.update(state=ReplicaState.FAILED, desired=False, error=reason,
                    state_changed_at=now)
    live.bump_routes_on_commit()
    return deployments


def do_drain_node(node: Node, now: datetime | None = None) -> None:
    """Stop placing on the node and move its replicas; the agent drains them."""
    now = now or timezone.now()
    with transaction.atomic():
        Node.objects.filter(pk=node.pk).update(status=NodeStatus.DRAINING,
                                               status_changed_at=now)
        live_replicas = node.replicas.filter(desired=True)
        deployments = set(live_replicas.values_list("deployment_id", flat=True))
        live_replicas.update(desired=False)
        live.bump_routes_on_commit()
    reconcile_deployments_of(deployments, now)
    live_events.publish(NodeStatusChanged(node.pk))
    live_events.publish(ReplicasChanged(tuple(deployments)))


def do_remove_node(node: Node, now: datetime | None = None) -> None:
    """Forget the node: its secret stops working and its replicas are replaced."""
    now = now or timezone.now()
    node_id = node.pk
    with transaction.atomic():
        deployments = _release_replicas(Q(node=node), now, "node removed")
        Replica.objects.filter(node=node).update(state=ReplicaState.STOPPED, desired=False)
        node.delete()
    live.forget(node_id)
    reconcile_deployments_of(deployments, now)
    live_events.publish(NodeStatusChanged(node_id, "removed", node.name))
    live_events.publish(ReplicasChanged(tuple(deployments)))


def do_deregister_node(node: Node, now: datetime | None = None) -> None:
    """An agent that shuts down cleanly: offline at once, replicas replaced elsewhere."""
    now = now or timezone.now()
    with transaction.atomic():
        Node.objects.filter(pk=node.pk).update(status=NodeStatus.OFFLINE,
                                               status_changed_at=now)
        deployments = _release_replicas(Q(node=node), now, "node deregistered")
        Replica.objects.filter(node=node, state=ReplicaState.FAILED,
                               error="node deregistered").update(state=ReplicaState.STOPPED)
    live.forget(node.pk)
    if _may_place():
        reconcile_deployments_of(deployments, now)
    live_events.publish(NodeStatusChanged(node.pk))
    live_events.publish(ReplicasChanged(tuple(deployments)))


def _may_place() -> bool:
    """False while `make run` shuts down: its leaving workers' replicas are not re-placed
    on whatever node remains (swarm_portal/stopping.py)."""
    return not stopping.is_stopping(settings.VAR_DIR)
