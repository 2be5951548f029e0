"""The live routing state: one balancer and one wait queue per deployment, fed by tables."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from serving.balancing import (
    Balancer,
    BalancerConfig,
    Lease,
    Outcome,
    Policy,
    RoutableReplica,
    Unavailable,
)
from serving.gateway.metrics import LiveDeployment, LiveReplica
from serving.gateway.node_tls import UpstreamTls, replica_tls
from serving.gateway.routes import DeploymentRoute, RouteTable

logger = logging.getLogger("serving.gateway")


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    """Where to send an attempt, and the credentials the replica wants."""

    host: str
    port: int
    authorization: tuple[bytes, bytes]
    tls: UpstreamTls | None = None  # None: plain HTTP (a loopback node)


class WaitQueue:
    """Requests waiting for a free replica slot, woken one at a time as leases end."""

    def __init__(self) -> None:
        self._waiters: dict[int | None, deque[asyncio.Future[None]]] = {}
        self.depth = 0

    async def wait(self, version: int | None, limit: int, timeout_s: float) -> bool:
        """Wait until woken (True) or until the timeout (False); False at once when full."""
        if self.depth >= limit or timeout_s <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(version, deque())
        queue.append(waiter)
        self.depth += 1
        woken = False
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
            woken = True
        except TimeoutError:
            pass
        finally:
            self.depth -= 1
            if not waiter.done():
                waiter.cancel()
                queue.remove(waiter)
            elif not woken:
                self.wake(version)  # we were woken but are leaving: pass the turn on
        return woken

    def wake(self, version: int | None) -> None:
        """Wake the first waiter for this version and the first waiting for any version."""
        if not self.depth:
            return
        self._wake_first(self._waiters.get(version))
        if version is not None:
            self._wake_first(self._waiters.get(None))

    def wake_all(self) -> None:
        """Wake everybody (the table changed: new replicas may have room)."""
        for queue in self._waiters.values():
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)

    @staticmethod
    def _wake_first(queue: deque[asyncio.Future[None]] | None) -> None:
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def balancer_config(base: BalancerConfig, route: DeploymentRoute) -> BalancerConfig:
    """Return the balancer settings for a deployment: the base with its policy."""
    try:
        return dataclasses.replace(base, policy=Policy(route.policy))
    except ValueError:
        logger.warning("deployment %s: unknown policy %r, using %s", route.name, route.policy,
                       base.policy.value)
        return base


def routable_replicas(route: DeploymentRoute) -> list[RoutableReplica]:
    """Return the deployment's replicas as the balancer sees them."""
    return [RoutableReplica(r.replica_id, f"{r.host}:{r.port}", r.version,
                            route.max_in_flight_per_replica, r.draining)
            for r in route.replicas]


def default_version(route: DeploymentRoute) -> int | None:
    """Return the version metadata describes when none is named: the heaviest, then newest."""
    if route.weights:
        return max(route.weights, key=lambda v: (route.weights[v], v))
    return max(route.versions, default=None)


def without_tunnels(table: RouteTable) -> RouteTable:
    """Return the table without the replicas only a tunnel reaches: a gateway with no
    tunnel server (no --tunnel-port) cannot reach them."""
    if not any(r.tunnel for route in table.deployments.values() for r in route.replicas):
        return table
    return dataclasses.replace(table, deployments={
        name: dataclasses.replace(route, replicas=tuple(r for r in route.replicas
                                                        if not r.tunnel))
        for name, route in table.deployments.items()})


class DeploymentRuntime:
    """One deployment's balancer, replica addresses, wait queue and cached answers."""

    def __init__(self, route: DeploymentRoute, balancer: Balancer,
                 tls: dict[int, UpstreamTls] | None = None) -> None:
        self.balancer = balancer
        self.waiting = WaitQueue()
        self.leased = 0  # leases not yet released, wherever their replica went since
        self.apply(route, tls)

    def apply(self, route: DeploymentRoute, tls: dict[int, UpstreamTls] | None = None) -> None:
        """Adopt a new version of this deployment's route (ValueError: left unchanged);
        `tls`: {replica id: how to reach it over TLS} (node_tls.replica_tls)."""
        self.balancer.update_replicas(routable_replicas(route))  # validates first
        self.route = route
        self.name = route.name
        tls = tls or {}
        self.targets = {r.replica_id: ReplicaTarget(
            r.host, r.port, (b"authorization", f"Bearer {r.replica_key}".encode()),
            tls.get(r.replica_id)) for r in route.replicas}
        # A pinned request may name any listed version, even at weight 0 (a canary tried
        # by name); unpinned traffic only ever draws versions with a positive weight.
        self.routing_weights = {v: route.weights.get(v, 0.0)
                                for v in {*route.versions, *route.weights}}
        weighted = [v for v, w in route.weights.items() if w > 0]
        self.has_traffic = bool(weighted)
        # The common case, one version: no draw needed for unpinned requests.
        self.sole_version = weighted[0] if len(weighted) == 1 else None
        self._metadata: dict[int | None, bytes] = {}
        self.waiting.wake_all()

    def choose(self, now_s: float, exclude: frozenset[int], version: int | None,
               affinity: bytes | None = None) -> Lease | Unavailable:
        """Return a lease on a replica for one attempt, or why there is none (`affinity`:
        a prompt's prefix key, see serving/affinity.py)."""
        lease = self.balancer.choose(now_s, exclude, version, affinity)
        if isinstance(lease, Lease):
            self.leased += 1
        return lease

    def release(self, lease: Lease, outcome: Outcome, latency_s: float, now_s: float) -> bool:
        """End an attempt and wake a waiter; return whether it ejected the replica."""
        ejected_until_s = lease.state.ejected_until_s
        if lease.release(outcome, latency_s, now_s):
            self.leased -= 1
        self.waiting.wake(lease.version)
        return lease.state.ejected_until_s != ejected_until_s

    def metadata(self, version: int | None) -> bytes:
        """Return the model metadata document (version None: the default version)."""
        body = self._metadata.get(version)
        if body is None:
            shown = default_version(self.route) if version is None else version
            info = self.route.versions.get(shown) if shown is not None else None
            body = json.dumps({
                "name": self.name, "versions": [str(v) for v in sorted(self.route.versions)],
                "platform": info.platform if info else "",
                "inputs": info.inputs if info else [], "outputs": info.outputs if info else [],
            }, separators=(",", ":")).encode()
            self._metadata[version] = body
        return body

    def is_ready(self, version: int | None) -> bool:
        """Return whether a non-draining replica serves this version (None: any weighted)."""
        weights = self.route.weights
        return any(not r.draining and (r.version == version if version is not None
                                       else weights.get(r.version, 0.0) > 0)
                   for r in self.route.replicas)

    def live(self, now_s: float) -> LiveDeployment:
        """Return the figures the metrics scrape shows."""
        return LiveDeployment(self.name, self.waiting.depth, tuple(
            LiveReplica(s.replica.replica_id, s.replica.address, s.replica.version,
                        s.outstanding, s.is_ejected(now_s))
            for s in self.balancer.replicas))


class Fleet:
    """Every deployment's runtime, rebuilt in place from each new routing table."""

    def __init__(self, rng: random.Random, base_config: BalancerConfig) -> None:
        self._rng = rng
        self._base_config = base_config
        self.table = RouteTable(revision="")
        self.deployments: dict[str, DeploymentRuntime] = {}
        # Set by the tunnel server (serving/gateway/tunnel.py): the table as this gateway
        # reaches it, with tunnel replicas on in-process hosts or left out.
        self.reroute: Callable[[RouteTable], RouteTable] | None = None
        # Removed deployments stay here: their in-flight leases still end in their balancer.
        self._every_runtime: dict[str, DeploymentRuntime] = {}

    def apply(self, table: RouteTable) -> None:
        """Adopt a new table, keeping what the balancers learnt about surviving replicas."""
        deployments: dict[str, DeploymentRuntime] = {}
        routed = without_tunnels(table) if self.reroute is None else self.reroute(table)
        tls = replica_tls(table)
        for name, route in routed.deployments.items():
            try:
                deployments[name] = self._runtime_for(name, route, tls)
            except ValueError:
                logger.exception("deployment %s: bad route, keeping the previous one", name)
                if name in self.deployments:
                    deployments[name] = self.deployments[name]
        for name, runtime in self._every_runtime.items():
            if name not in deployments and runtime.route.replicas:
                # Gone from the table: requests still queued for it must not reach replicas
                # the table no longer lists.
                runtime.apply(dataclasses.replace(runtime.route, replicas=(), weights={}))
        self.table = table
        self.deployments = deployments

    def _runtime_for(self, name: str, route: DeploymentRoute,
                     tls: dict[int, UpstreamTls]) -> DeploymentRuntime:
        config = balancer_config(self._base_config, route)
        runtime = self._every_runtime.get(name)
        if runtime is None:
            runtime = DeploymentRuntime(route, Balancer(self._rng, config), tls)
            self._every_runtime[name] = runtime
        else:
            runtime.apply(route, tls)
            runtime.balancer.reconfigure(config)
        return runtime

    def in_flight(self) -> dict[str, int]:
        """Return leases not yet released per deployment (including removed ones)."""
        return {name: runtime.leased for name, runtime in self._every_runtime.items()}

    def balancer_in_flight(self) -> dict[str, int]:
        """Return what each balancer counts in flight on the replicas it still lists."""
        return {name: runtime.balancer.in_flight()
                for name, runtime in self._every_runtime.items()}

    def queue_depth(self) -> dict[str, int]:
        """Return requests waiting per deployment."""
        return {name: runtime.waiting.depth for name, runtime in self._every_runtime.items()}

    def live(self, now_s: float) -> Iterator[LiveDeployment]:
        """Yield the scrape-time figures of the deployments in the table."""
        for runtime in list(self.deployments.values()):
            yield runtime.live(now_s)
