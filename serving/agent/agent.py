"""The agent loop: join, then heartbeat and reconcile replicas until told to stop.

The command line's settings and the exit codes are in agent_config.py, registering with
the portal in joining.py; both are importable from here too.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serving.agent import credentials as creds
from serving.agent import credentials_tls, joining
from serving.agent.agent_config import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PORTAL_LOST,
    EXIT_REVOKED,
    JOIN_HINT,
    AgentConfig,
    AgentExit,
)
from serving.agent.cache import ArtifactCache
from serving.agent.client import CredentialsRevoked, PortalClient, PortalError
from serving.agent.devices import DeviceBackend, attribute_processes
from serving.agent.replicas import ReplicaManager, ReplicaSettings
from serving.agent.tunnel import Tunnels
from swarm_protocol.agent_messages import (
    DesiredReplica,
    DeviceInfo,
    HeartbeatRequest,
    HeartbeatResponse,
)

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_PORTAL_LOST", "EXIT_REVOKED", "JOIN_HINT", "Agent",
           "AgentConfig", "AgentExit"]
log = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.2  # how often replica states are checked between heartbeats
MIN_HEARTBEAT_GAP_S = 0.2  # a state change is reported early, but not faster than this
HEARTBEAT_BACKOFF_MAX_S = 10.0  # a portal that comes back is not met by every node at once
ARTIFACT_WORKERS = 2
_FAILURE_LOG_EVERY = 30


class Agent:
    """One node's agent: owns the portal client, the artifact cache and the replicas."""

    def __init__(self, config: AgentConfig, devices: DeviceBackend,
                 client: PortalClient | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[], float] = random.random) -> None:
        self.config = config
        self.stop_requested = threading.Event()
        self.state_dir = creds.node_state_dir(config.cache_dir, config.name)
        self._dir_lock = creds.lock_node_dir(self.state_dir)
        self.credentials: creds.NodeCredentials | None = None
        self.interval_s = config.heartbeat_interval_s or 1.0
        self._devices = devices
        self._client = client or PortalClient(config.portal_url, config.http_timeout_s)
        self._clock = clock
        self._jitter = jitter  # in [0, 1): spreads retries so nodes do not retry in step
        self._executor = ThreadPoolExecutor(ARTIFACT_WORKERS, thread_name_prefix="artifact")
        self.cache = ArtifactCache(config.cache_dir, self._client, self.stop_requested)
        self.cache.remove_partial_downloads()
        self.replicas = ReplicaManager(self._replica_settings(), self._prepare_artifact,
                                       self._executor)
        # Leftover or adopted replicas of a previous run answer with the stored certificate.
        self.tls_files = credentials_tls.load_tls_files(self.state_dir) if config.tls else None
        self.replicas.use_tls(self.tls_files)
        self._last_heartbeat_s: float | None = None
        self._next_heartbeat_s = 0.0
        self._change_pending = False
        self.heartbeat_failures = 0
        self._failing_since_s: float | None = None
        self.tunnels = Tunnels(config.port_range)  # used in tunnel mode only

    @property
    def next_heartbeat_s(self) -> float:
        """Return when (on the agent's clock) the next heartbeat is due."""
        return self._next_heartbeat_s

    def run(self) -> int:
        """Join, loop until stopped, drain and leave; return the process exit code."""
        try:
            self.join()
            self._loop()
        except AgentExit as stop:
            if str(stop):
                log.error("%s", stop)
            self.shutdown(deregister=False)
            return stop.exit_code
        self.shutdown(deregister=True)
        return EXIT_OK

    def join(self) -> creds.NodeCredentials:
        """Load this node's stored credentials, or register with the join token.

        With stored credentials this is the same node as before: the replicas a previous
        run left are adopted, so the first heartbeat reports them ready. A new node starts
        clean: anything left running belongs to a node the portal may have removed.
        """
        stored = creds.load_credentials(self.state_dir, self.config.portal_url)
        if stored is not None and self.config.tls and not credentials_tls.load_tls_files(
                self.state_dir):
            log.warning("stored credentials in %s have no TLS certificate: joining again",
                        self.state_dir)
            stored = None
        if stored is not None:
            log.info("using stored credentials of node %d (%s)", stored.node_id, self.state_dir)
            self._use(stored)
            adopted = self.replicas.adopt(stored.replica_key, self._clock())
            if adopted:
                log.info("adopted %d running replicas from the previous run", adopted)
            return stored
        self._drain_leftovers()
        return self._register()

    def step(self, now_s: float) -> None:
        """Advance replica states, and heartbeat when due or when a state changed."""
        if self.replicas.step(now_s):
            self._change_pending = True
        last_s = self._last_heartbeat_s
        early = self._change_pending and (last_s is None or now_s - last_s >= MIN_HEARTBEAT_GAP_S)
        if last_s is None or now_s >= self._next_heartbeat_s or early:
            self.heartbeat(now_s)

    def heartbeat(self, now_s: float) -> HeartbeatResponse | None:
        """Send one heartbeat and reconcile its reply; return it (None when it failed)."""
        self._last_heartbeat_s = now_s
        self._next_heartbeat_s = now_s + self.interval_s
        self._change_pending = False
        request = self._heartbeat_request()
        try:
            response = self._client.heartbeat(request)
        except CredentialsRevoked as error:
            self._on_revoked(error, now_s)
            return None
        except PortalError as error:
            self._on_heartbeat_failure(error, now_s)
            return None
        if self.heartbeat_failures:
            log.info("portal reachable again after %d failed heartbeats", self.heartbeat_failures)
            self.heartbeat_failures = 0
        self._failing_since_s = None
        # Only now: lines a failed heartbeat carried go again with the next one.
        self.replicas.acknowledge_logs(request.replicas)
        self._apply(response, now_s)
        return response

    def shutdown(self, deregister: bool) -> None:
        """Drain every replica (in-flight requests finish), then leave the pool."""
        self.stop_requested.set()  # also cancels artifact downloads in flight
        self.replicas.drain_all(self._clock())
        if deregister and self.replicas.live_count():
            self._report_quietly()  # the portal sees `draining` and stops routing there
        self._wait_for_drain()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if deregister:
            self._deregister()
        self.replicas.close()
        self.tunnels.close()  # only now: draining replicas answered through it
        self._client.close()
        self._dir_lock.close()

    def _loop(self) -> None:
        while not self.stop_requested.is_set():
            self.step(self._clock())
            self.stop_requested.wait(POLL_INTERVAL_S)
        log.info("stop requested: draining %d replicas", self.replicas.live_count())

    def _register(self) -> creds.NodeCredentials:
        joined = joining.register(self.config, self._client, self.state_dir,
                                  self._read_devices(), self.stop_requested)
        if joined.tls_files is not None:
            self.tls_files = joined.tls_files
            self.replicas.use_tls(joined.tls_files)
        self._use(joined.credentials, joined.heartbeat_interval_s)
        return joined.credentials

    def _use(self, stored: creds.NodeCredentials, interval_s: float | None = None) -> None:
        self.credentials = stored
        self._client.node_secret = stored.node_secret
        if interval_s:
            self._follow_interval(interval_s)

    def _follow_interval(self, interval_s: float) -> None:
        if self.config.heartbeat_interval_s is None and interval_s > 0:
            self.interval_s = interval_s
            if self._last_heartbeat_s is not None:
                self._next_heartbeat_s = self._last_heartbeat_s + interval_s

    def _heartbeat_request(self) -> HeartbeatRequest:
        self.replicas.refresh_stats()
        self.replicas.collect_logs()
        return HeartbeatRequest(devices=self._read_devices(), replicas=self.replicas.statuses(),
                                cached_artifacts=self.cache.cached_sha256s(),
                                csr_pem=credentials_tls.due_renewal_csr(self.tls_files))

    def _apply(self, response: HeartbeatResponse, now_s: float) -> None:
        assert self.credentials is not None
        if response.certificate_pem:
            credentials_tls.take_renewal(self.tls_files, response.certificate_pem)
        if response.replica_key != self.credentials.replica_key:
            log.warning("the portal sent a new replica key: replicas started from now on use it")
            self.credentials = creds.NodeCredentials(
                portal_url=self.credentials.portal_url, node_id=self.credentials.node_id,
                node_secret=self.credentials.node_secret, replica_key=response.replica_key)
            creds.save_credentials(self.state_dir, self.credentials)
        self._follow_interval(response.heartbeat_interval_s)
        self.replicas.reconcile(response.desired, response.replica_key, now_s)
        if response.reach_mode == "tunnel":
            self.tunnels.update(self.credentials.node_id, response.tunnel_key,
                                response.tunnel_urls)

    def _on_heartbeat_failure(self, error: PortalError, now_s: float) -> None:
        # Replicas and their states stay as they are: a busy portal is no reason to stop
        # serving. Only the next try moves, by a jittered exponential backoff ("equal
        # jitter"), so a fleet that a slow portal failed at once does not retry at once.
        self.heartbeat_failures += 1
        if self._failing_since_s is None:
            self._failing_since_s = now_s
        lost_s = self.config.portal_lost_exit_s
        if lost_s and now_s - self._failing_since_s >= lost_s:
            raise AgentExit(EXIT_PORTAL_LOST, f"no heartbeat got through for {lost_s:g} s "
                                              f"(--portal-lost-exit-s): draining and exiting")
        backoff_s = min(self.interval_s * 2 ** min(self.heartbeat_failures - 1, 16),
                        HEARTBEAT_BACKOFF_MAX_S)
        jittered_s = backoff_s * (0.5 + 0.5 * self._jitter())
        self._next_heartbeat_s = now_s + max(self.interval_s, jittered_s)
        if self.heartbeat_failures % _FAILURE_LOG_EVERY == 1:
            log.warning("heartbeat failed (%d in a row; replicas keep running, retrying): %s",
                        self.heartbeat_failures, error)

    def _on_revoked(self, error: CredentialsRevoked, now_s: float) -> None:
        node_id = self.credentials.node_id if self.credentials else None
        log.error("the portal rejected the credentials of node %s (the node was removed?): %s",
                  node_id, error)
        creds.forget_credentials(self.state_dir)
        credentials_tls.forget_identity(self.state_dir)
        self.tls_files = None
        self.credentials = None
        self._client.node_secret = None
        if not self.config.join_token:
            raise AgentExit(EXIT_REVOKED, "node credentials revoked and no join token given: "
                                          f"exiting (to rejoin, {JOIN_HINT})")
        # The replicas belong to a node the portal no longer knows: drain them before
        # joining again, so the new node never reports replicas that are not its own.
        self.replicas.drain_all(now_s)
        self._wait_for_drain()
        self.replicas.forget_finished()
        log.info("registering again with the join token")
        self._register()

    def _drain_leftovers(self) -> None:
        """Drain replicas a previous run left (no credentials: they are no node's now)."""
        self.replicas.adopt(None, self._clock())
        self._wait_for_drain()
        self.replicas.forget_finished()

    def _read_devices(self) -> list[DeviceInfo]:
        """Return the devices, each GPU process tied to the replica it belongs to."""
        try:
            return attribute_processes(self._devices.devices(), self.replicas.pids())
        except Exception:  # a device library failing must not stop heartbeats
            log.exception("could not read devices")
            return []

    def _prepare_artifact(self, desired: DesiredReplica) -> Path:
        return self.cache.ensure(desired.sha256, desired.size_bytes)

    def _replica_settings(self) -> ReplicaSettings:
        return ReplicaSettings(
            replicas_dir=self.state_dir / "replicas", port_range=self.config.port_range,
            bind_host=self.config.bind_host, ready_timeout_s=self.config.ready_timeout_s,
            drain_grace_s=self.config.drain_grace_s, drain_delay_s=self.config.drain_delay_s,
            replica_module=self.config.replica_module,
            watchdog_s=self.config.replica_watchdog_s)

    def _report_quietly(self) -> None:
        try:
            self._client.heartbeat(self._heartbeat_request())
        except PortalError as error:
            log.info("could not report draining replicas: %s", error)

    def _wait_for_drain(self) -> None:
        # The manager kills what has not drained after the grace period, so this ends.
        while self.replicas.live_count():
            self.replicas.step(self._clock())
            time.sleep(POLL_INTERVAL_S / 2)

    def _deregister(self) -> None:
        if self.credentials is None:
            return
        try:
            self._client.deregister()
            log.info("node %d deregistered", self.credentials.node_id)
        except PortalError as error:
            log.warning("could not deregister (the portal will mark this node offline): %s",
                        error)

