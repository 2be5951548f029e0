"""The gateway's table from the database, and portal sessions for the playground.

The gateway (serving/gateway/, no Django) polls `revision()` a few times a second: a
cache read. Only when it changes, or every few seconds as a safety net, does it call
`load()`, which builds the whole table in a handful of queries, off the request path.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.base import SessionBase
from django.db import DatabaseError, close_old_connections, connection
from django.db.models import Q
from django.utils.module_loading import import_string

from registry.models import ModelVersion
from serving import live, node_ca
from serving.gateway.routes import (
    ApiKeyRoute,
    DeploymentRoute,
    ReplicaRoute,
    RouteTable,
    VersionInfo,
)
from serving.models import ApiKey, Deployment, NodeStatus, Replica, ReplicaState
from serving.secrets import replica_key
from serving.services import reachability
from serving.services.keys import record_keys_used

logger = logging.getLogger(__name__)


def effective_weights(target: dict[int, float], ready: set[int]) -> dict[int, float]:
    """Return the split to use now: the target over versions that have ready replicas.

    While a roll is under way (the new version not ready yet) the versions that are
    ready keep serving; versions ready but outside the target get weight 0, so they
    are reachable only by pinning /versions/{v}.
    """
    served = {v: w for v, w in target.items() if v in ready and w > 0}
    if not served:
        served = {v: 1.0 for v in ready} or dict(target)
    return {**{v: 0.0 for v in ready}, **served}


def _routable_replicas() -> dict[int, list[ReplicaRoute]]:
    # A node declared offline keeps its ready replicas in the table until their
    # replacements are ready (make before break): a node that only missed heartbeats
    # still serves, and the gateway ejects replicas that really stopped answering.
    on_live_node = Q(state__in=[ReplicaState.READY, ReplicaState.DRAINING],
                     node__status__in=[NodeStatus.READY, NodeStatus.DRAINING])
    standing_in = Q(state=ReplicaState.READY, desired=True, node__status=NodeStatus.OFFLINE)
    rows = (Replica.objects.filter(on_live_node | standing_in, port__isnull=False)
            .values_list("deployment_id", "pk", "node_id", "node__address", "port",
                         "version__number", "state", "desired", "node__reach_mode",
                         "node__cert_sha256"))
    by_deployment: dict[int, list[ReplicaRoute]] = defaultdict(list)
    for deployment_id, pk, node_id, address, port, number, state, desired, mode, tls in rows:
        by_deployment[deployment_id].append(ReplicaRoute(
            replica_id=pk, host=address, port=port, replica_key=replica_key(node_id),
            version=number, draining=state == ReplicaState.DRAINING or not desired,
            node_id=node_id, tunnel=mode == reachability.TUNNEL, tls_sha256=tls))
    return by_deployment


def _version_infos(model_ids: set[int]) -> dict[tuple[int, int], VersionInfo]:
    versions = ModelVersion.objects.filter(model_id__in=model_ids).only(
        "model_id", "number", "format", "signature", "steps")
    infos = {}
    for version in versions:
        served = version.served_signature  # what clients send and get, after any steps
        infos[(version.model_id, version.number)] = VersionInfo(
            platform=version.platform, inputs=served["inputs"], outputs=served["outputs"])
    return infos


def _deployment_route(deployment: Deployment, replicas: list[ReplicaRoute],
                      infos: dict[tuple[int, int], VersionInfo]) -> DeploymentRoute:
    target = ({int(v): float(w) for v, w in deployment.traffic.items()}
              or {deployment.version.number: 1.0})
    ready = {r.version for r in replicas if not r.draining}
    weights = effective_weights(target, ready)
    numbers = set(weights) | {r.version for r in replicas}
    return DeploymentRoute(
        name=deployment.name, deployment_id=deployment.pk, weights=weights,
        versions={n: infos[(deployment.model_id, n)] for n in numbers
                  if (deployment.model_id, n) in infos},
        replicas=tuple(sorted(replicas, key=lambda r: r.replica_id)),
        policy=deployment.policy, max_in_flight_per_replica=deployment.max_in_flight_per_replica,
        queue_limit=deployment.queue_limit, request_timeout_s=deployment.request_timeout_s,
        prefix_affinity_chars=deployment.prefix_affinity_chars,
        hold_timeout_s=settings.GATEWAY_HOLD_TIMEOUT_S if deployment.hold_at_zero else 0.0)


def _api_keys() -> dict[str, ApiKeyRoute]:
    keys = ApiKey.objects.filter(revoked_at__isnull=True).prefetch_related("deployments")
    return {key.key_hash: ApiKeyRoute(
        key_id=key.pk, digest=key.key_hash,
        deployments=None if key.all_deployments else frozenset(
            d.name for d in key.deployments.all()),
        expires_at_s=key.expires_at.timestamp() if key.expires_at else None,
        rate_limit_rps=key.rate_limit_rps, burst=key.burst,
        tokens_per_minute=key.rate_limit_tokens_per_minute) for key in keys}


def build_route_table(revision: str = "") -> RouteTable:
    """Return the whole routing table from the database (a handful of queries)."""
    # Runs in a worker thread outside any request cycle: drop dead or expired connections.
    close_old_connections()
    return route_table(revision)


def route_table(revision: str = "") -> RouteTable:
    """Return the whole routing table on the current connection (at most 6 queries)."""
    deployments = list(Deployment.objects.filter(deleting=False).select_related("version"))
    replicas = _routable_replicas()
    infos = _version_infos({d.model_id for d in deployments})
    # Only when some replica serves TLS: a pool of loopback nodes costs no query for it.
    tls = any(r.tls_sha256 for routes in replicas.values() for r in routes)
    return RouteTable(
        revision=revision,
        deployments={d.name: _deployment_route(d, replicas.get(d.pk, []), infos)
                     for d in deployments},
        api_keys=_api_keys(),
        tunnels=reachability.tunnel_digests(reachability.tunnel_node_ids()),
        node_ca_pem=node_ca.ca_certificate_pem() if tls else "")


def share_caps(table: RouteTable, gateways: int) -> RouteTable:
    """Return the table with each deployment's per-replica cap and queue limit split over
    `gateways` processes (ceil, at least 1): together they keep a replica's cap."""
    if gateways <= 1:
        return table
    deployments = {name: replace(
        route,
        max_in_flight_per_replica=max(1, math.ceil(route.max_in_flight_per_replica / gateways)),
        queue_limit=max(1, math.ceil(route.queue_limit / gateways)))
        for name, route in table.deployments.items()}
    return replace(table, deployments=deployments)


def _closing(function: Any) -> Any:
    """Run `function` in a worker thread and close that thread's connection afterwards.

    The gateway's loads are seconds apart and run on arbitrary executor threads: a
    connection left open there would sit idle (and block dropping a test database).
    """
    def run(*args: Any) -> Any:
        try:
            return function(*args)
        finally:
            connection.close()

    return sync_to_async(run, thread_sensitive=False)


class DatabaseTableSource:
    """TableSource backed by the database and the cache's revision counter."""

    async def revision(self) -> str:
        return await sync_to_async(live.routes_revision, thread_sensitive=False)()

    async def load(self) -> RouteTable:
        revision = await self.revision()
        return await _closing(build_route_table)(revision)

    async def report_successes(self, latest_s_by_replica: dict[int, float],
                               keys_used_s: dict[int, float] | None = None) -> None:
        """Record when each replica last answered a request successfully (time.time()).

        The offline sweep's evidence that a node whose heartbeats are late still serves.
        Call it at most once a second, with the replicas that succeeded since the last
        call: one cache write, never raises. `keys_used_s` ({API key id: unix s}) sets
        the keys' last_used_at (to the minute).
        """
        await sync_to_async(live.record_replica_successes,
                            thread_sensitive=False)(latest_s_by_replica)
        if keys_used_s:
            try:
                await _closing(record_keys_used)(keys_used_s, time.time())
            except DatabaseError:  # a late "last used" is no reason to fail serving
                logger.warning("could not record the API keys' last use", exc_info=True)


def session_user_active(session_key: str) -> bool:
    """Return whether a Django session belongs to an active, logged-in user (queries)."""
    store: SessionBase = import_string(f"{settings.SESSION_ENGINE}.SessionStore")(session_key)
    user_id: Any = store.get("_auth_user_id")
    if user_id is None:
        return False
    return get_user_model().objects.filter(pk=user_id, is_active=True).exists()


class PortalSessionAuth:
    """SessionAuth: any active, logged-in portal user may call deployments (playground)."""

    async def allows(self, session_key: str, deployment: str) -> bool:
        return await _closing(session_user_active)(session_key)


