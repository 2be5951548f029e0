"""The replica process manager: desired replicas in, running replica servers out.

Each replica goes starting -> ready -> draining -> stopped, or to failed with a reason.
`reconcile()` takes the portal's wishes, `step(now_s)` moves states along (process exits,
readiness, drain deadlines) and `refresh_stats()` reads the figures each heartbeat carries.
Artifacts are fetched and verified on an executor so that a large download never holds up
the heartbeats. Replicas outlive a killed agent: `adopt()` takes back the ones a previous
run left that are still provably the same process and healthy (see survivors.py).
"""

from __future__ import annotations

import logging
import shutil
import signal
import ssl
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

import httpx

from serving.agent import processes, replica_stats, survivors
from serving.agent.credentials_tls import TlsFiles, replica_client_context
from serving.agent.logs import LogTail
from serving.agent.replica_types import (
    ALIVE_FILE,
    LIVE_STATES,
    MAX_PORT_CLASHES,
    READY_PATH,
    REPLICA_FORMATS,
    STATS_PATH,
    ManagedReplica,
    ReplicaSettings,
    alive,
    fail,
    with_stderr,
    written_at_s,
)
from swarm_protocol.agent_messages import DesiredReplica, ReplicaStatus
from swarm_protocol.signature import SignatureError, parse_signature
from swarm_protocol.steps import StepsError, parse_steps

log = logging.getLogger(__name__)
# The records and settings live in replica_types.py; importers take them here too.
__all__ = ["ALIVE_FILE", "REPLICA_FORMATS", "ManagedReplica", "ReplicaManager",
           "ReplicaSettings"]


class ReplicaManager:
    """Starts, watches, drains and stops this node's replica server processes."""

    def __init__(self, settings: ReplicaSettings,
                 prepare_artifact: Callable[[DesiredReplica], Path],
                 executor: Executor, wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._wall_clock = wall_clock
        self.replicas: dict[int, ManagedReplica] = {}
        self._prepare_artifact = prepare_artifact
        self._executor = executor
        self._http = httpx.Client(timeout=settings.http_timeout_s)
        self._tls: TlsFiles | None = None  # None: replicas serve plain HTTP (loopback nodes)
        self._last_port: int | None = None
        settings.replicas_dir.mkdir(parents=True, exist_ok=True)
        self.alive_file = survivors.AliveFile(settings.replicas_dir / ALIVE_FILE,
                                              every_s=min(1.0, settings.watchdog_s / 4))
        self.alive_file.start()  # before the scan: a waiting survivor must not give up now
        self._survivors = survivors.find_survivors(settings.replicas_dir,
                                                   settings.replica_module)

    def adopt(self, replica_key: str | None, now_s: float) -> int:
        """Take over the replicas a previous agent run left running; return how many serve.

        One that is healthy under `replica_key` is ready at once, so the first heartbeat
        keeps it in the portal's routing table; one still loading or already draining goes
        on doing so; any other is drained (None: no credentials, drain them all).
        """
        adopted = 0
        for survivor in self._survivors:
            replica = self._adopted_replica(survivor, replica_key or "", now_s)
            self.replicas[replica.replica_id] = replica
            found = self._survivor_state(replica, survivor.record, replica_key)
            log.info("replica %d: process %d on port %d left by a previous run: %s",
                     replica.replica_id, survivor.process.pid, replica.port, found)
            if found == "ready":
                replica.state = "ready"
                adopted += 1
            elif found == "draining":
                # Signalled already: a second SIGTERM would cut its requests short.
                replica.state, replica.signalled = "draining", True
                replica.drain_started_at_s = now_s - self.settings.drain_delay_s
            elif found != "loading":  # loading: stays starting, under the ready timeout
                self._begin_drain(replica, now_s)
        self._survivors = []
        return adopted

    def _survivor_state(self, replica: ManagedReplica, record: survivors.ReplicaRecord,
                        replica_key: str | None) -> str:
        """Return ready, loading or draining (what it says), else why it cannot be kept."""
        if replica_key is None:
            return "no credentials to keep it under"
        if record.key_sha256 != survivors.key_sha256(replica_key):
            return "its key is not the current one"
        try:
            response = self._get(replica, STATS_PATH)
            state = response.json().get("state") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            state = None
        if state == "ready" and self._answers(replica, READY_PATH):
            return "ready"
        if state in ("loading", "draining"):
            return str(state)
        return "it does not answer its health check"

    def use_tls(self, files: TlsFiles | None) -> None:
        """Start replicas with this key and certificate from now on, and reach them by TLS."""
        self._tls = files
        self._http.close()
        verify: ssl.SSLContext | bool = replica_client_context(files) if files else True
        self._http = httpx.Client(timeout=self.settings.http_timeout_s, verify=verify)

    def reconcile(self, desired: list[DesiredReplica], replica_key: str, now_s: float) -> None:
        """Start what the portal wants and is not here; drain what it no longer wants."""
        wanted = {item.replica_id: item for item in desired}
        for replica_id, replica in list(self.replicas.items()):
            if replica.unconfirmed:
                self._confirm_adopted(replica, wanted.get(replica_id), replica_key, now_s)
            if replica_id in wanted:
                continue
            if replica.state in ("failed", "stopped"):
                self._forget(replica)  # reported at least once; the portal let it go
            else:
                self._begin_drain(replica, now_s)
        for replica_id, item in wanted.items():
            current = self.replicas.get(replica_id)
            if current is None or current.state == "stopped":
                self._admit(item, replica_key)

    def step(self, now_s: float) -> bool:
        """Advance every replica's state; return whether any state changed."""
        changed = False
        for replica in list(self.replicas.values()):
            before = replica.state
            self._step_one(replica, now_s)
            if replica.state != before:
                log.info("replica %d: %s -> %s%s", replica.replica_id, before, replica.state,
                         f" ({replica.error})" if replica.error else "")
                changed = True
        return changed

    def refresh_stats(self) -> None:
        """Read /stats from every replica that serves or drains."""
        for replica in self.replicas.values():
            if replica.state in ("ready", "draining") and alive(replica.process):
                self._read_stats(replica)

    def pids(self) -> dict[int, int]:
        """Return {process id: replica id} of every replica with a live process."""
        return {replica.process.pid: replica.replica_id for replica in self.replicas.values()
                if replica.process is not None and alive(replica.process)}

    def statuses(self) -> list[ReplicaStatus]:
        """Return one ReplicaStatus per tracked replica, by id."""
        return [self.replicas[key].status() for key in sorted(self.replicas)]

    def collect_logs(self) -> None:
        """Read every replica's new output lines (bounded), failed ones included."""
        for replica in self.replicas.values():
            if replica.logs is not None:
                replica.logs.collect()

    def acknowledge_logs(self, sent: list[ReplicaStatus]) -> None:
        """Drop the lines a heartbeat that got through carried (`sent`: its statuses)."""
        for status in sent:
            replica = self.replicas.get(status.replica_id)
            if replica is not None and replica.logs is not None:
                replica.logs.acknowledge(len(status.log_lines))

    def drain_all(self, now_s: float) -> None:
        """Begin draining every replica (the agent is leaving)."""
        for replica in self.replicas.values():
            self._begin_drain(replica, now_s)

    def forget_finished(self) -> None:
        """Stop tracking every failed or stopped replica."""
        for replica in list(self.replicas.values()):
            if replica.state in ("failed", "stopped"):
                self._forget(replica)

    def live_count(self) -> int:
        """Return how many replicas still start, serve or drain."""
        return sum(1 for replica in self.replicas.values() if replica.state in LIVE_STATES)

    def close(self) -> None:
        """Release the HTTP client and stop vouching for the replicas (see drain_all)."""
        self.alive_file.stop()
        self._http.close()

    def _adopted_replica(self, survivor: survivors.Survivor, replica_key: str,
                         now_s: float) -> ManagedReplica:
        record = survivor.record
        self._last_port = record.port
        replica_dir = self.settings.replicas_dir / str(record.replica_id)
        return ManagedReplica(desired=record.desired_replica(), replica_key=replica_key,
                              port=record.port, process=survivor.process, launched_at_s=now_s,
                              unconfirmed=True, logs=LogTail(replica_dir),
                              started_at_s=written_at_s(replica_dir))

    def _confirm_adopted(self, replica: ManagedReplica, wanted: DesiredReplica | None,
                         replica_key: str, now_s: float) -> None:
        replica.unconfirmed = False
        if wanted is not None and (wanted != replica.desired or replica_key != replica.replica_key):
            log.warning("replica %d: the portal now wants it otherwise (other spec or key): "
                        "draining the adopted process", replica.replica_id)
            self._begin_drain(replica, now_s)

    def _forget(self, replica: ManagedReplica) -> None:
        del self.replicas[replica.replica_id]
        if replica.state == "stopped":
            # A failed replica's directory stays: its stderr.log tells an operator why.
            shutil.rmtree(self._replica_dir(replica), ignore_errors=True)

    def _admit(self, desired: DesiredReplica, replica_key: str) -> None:
        log.info("replica %d: starting %s v%d on %s", desired.replica_id, desired.model_name,
                 desired.version, desired.device)
        previous = self.replicas.get(desired.replica_id)
        replica = ManagedReplica(desired=desired, replica_key=replica_key,
                                 restarts=previous.restarts + 1 if previous else 0)
        replica.artifact = self._executor.submit(self._prepare_artifact, desired)
        self.replicas[desired.replica_id] = replica

    def _step_one(self, replica: ManagedReplica, now_s: float) -> None:
        if replica.state == "starting" and replica.process is None:
            self._launch_when_artifact_ready(replica, now_s)
        elif replica.state == "starting":
            self._check_starting(replica, now_s)
        elif replica.state == "ready":
            self._check_exited(replica, "exited unexpectedly")
        elif replica.state == "draining":
            self._check_draining(replica, now_s)

    def _launch_when_artifact_ready(self, replica: ManagedReplica, now_s: float) -> None:
        artifact = replica.artifact
        if artifact is None or not artifact.done():
            return
        error = artifact.exception()
        if error is not None:
            fail(replica, f"artifact not usable: {error}")
            return
        try:
            self._launch(replica, artifact.result(), now_s)
        except (OSError, RuntimeError, ValueError) as launch_error:
            fail(replica, f"could not start: {launch_error}")

    def _launch(self, replica: ManagedReplica, artifact_path: Path, now_s: float) -> None:
        desired = replica.desired
        if desired.format not in REPLICA_FORMATS:
            raise ValueError(f"unknown model format {desired.format!r}")
        try:
            signature = parse_signature(desired.signature)
        except SignatureError as error:
            raise ValueError(f"bad signature: {error}") from error
        if desired.steps:
            try:
                parse_steps(desired.steps, signature)
            except StepsError as error:
                raise ValueError(f"bad steps: {error}") from error
        taken = [r.port for r in self.replicas.values() if r.port is not None]
        port = processes.pick_port(self.settings.bind_host, self.settings.port_range, taken,
                                   self._last_port)
        self._last_port = port
        replica.port = port
        spec = self._launch_spec(replica, artifact_path)
        replica.logs = LogTail(spec.replica_dir)  # before the launch: from its first line
        replica.process = processes.launch_replica(spec)
        replica.launched_at_s = now_s
        replica.started_at_s = self._wall_clock()
        replica.counters = replica_stats.Counters()  # a new process counts from zero
        log.info("replica %d: process %d on port %d", desired.replica_id, replica.process.pid,
                 port)

    def _launch_spec(self, replica: ManagedReplica, artifact_path: Path) -> processes.LaunchSpec:
        assert replica.port is not None
        return processes.LaunchSpec(
            desired=replica.desired, artifact_path=artifact_path,
            replica_dir=self.settings.replicas_dir / str(replica.replica_id),
            bind_host=self.settings.bind_host, port=replica.port,
            replica_key=replica.replica_key, replica_module=self.settings.replica_module,
            python=self.settings.python, alive_file=self.alive_file.path,
            watchdog_s=self.settings.watchdog_s, tls=self._tls)

    def _check_starting(self, replica: ManagedReplica, now_s: float) -> None:
        if self._relaunched_after_port_clash(replica, now_s):
            return
        if self._check_exited(replica, "exited before it was ready"):
            return
        if self._answers(replica, READY_PATH):
            replica.state = "ready"
            return
        assert replica.launched_at_s is not None
        if now_s - replica.launched_at_s >= self.settings.ready_timeout_s:
            self._kill(replica)
            reason = f"not ready within {self.settings.ready_timeout_s:g}s"
            fail(replica, with_stderr(reason, self._replica_dir(replica)))

    def _relaunched_after_port_clash(self, replica: ManagedReplica, now_s: float) -> bool:
        """Start a replica again on the next free port when its process exited because its
        port was taken after pick_port found it free (another program bound it meanwhile:
        a probe cannot reserve a port); at most MAX_PORT_CLASHES times."""
        process, artifact = replica.process, replica.artifact
        if (process is None or process.poll() is None or artifact is None
                or isinstance(process, survivors.AdoptedProcess)
                or replica.port_clashes >= MAX_PORT_CLASHES):
            return False
        line = processes.last_stderr_line(self._replica_dir(replica)) or ""
        # Python's OSError says "Address already in use", uvicorn (the real replica's
        # server) "address already in use": errno 98 either way.
        if "address already in use" not in line.lower():
            return False
        replica.port_clashes += 1
        log.warning("replica %d: port %s was taken before it could listen: starting it on "
                    "another port", replica.replica_id, replica.port)
        try:
            self._launch(replica, artifact.result(), now_s)
        except (OSError, RuntimeError, ValueError) as launch_error:
            fail(replica, f"could not start: {launch_error}")
        return True

    def _check_exited(self, replica: ManagedReplica, what: str) -> bool:
        process = replica.process
        if process is None or process.poll() is None:
            return False
        # An adopted process is not our child: how it ended is not ours to know.
        exit_text = "exit code unknown" if isinstance(process, survivors.AdoptedProcess) \
            else f"exit code {process.returncode}"
        reason = f"replica process {what} ({exit_text})"
        fail(replica, with_stderr(reason, self._replica_dir(replica)))
        return True

    def _check_draining(self, replica: ManagedReplica, now_s: float) -> None:
        process = replica.process
        if process is None or process.poll() is not None:
            replica.state = "stopped"
            replica.stats = {}
            return
        self._signal_when_due(replica, now_s)
        assert replica.drain_started_at_s is not None
        if now_s - replica.drain_started_at_s >= self.settings.drain_grace_s:
            log.warning("replica %d did not drain within %gs: killing it", replica.replica_id,
                        self.settings.drain_grace_s)
            self._kill(replica)
            replica.error = f"killed: did not drain within {self.settings.drain_grace_s:g}s"
            replica.state = "stopped"
            replica.stats = {}

    def _begin_drain(self, replica: ManagedReplica, now_s: float) -> None:
        if replica.state not in ("starting", "ready"):
            return
        if replica.process is None:
            # Still fetching its artifact: nothing runs yet, so nothing to drain.
            if replica.artifact is not None:
                replica.artifact.cancel()
            replica.state = "stopped"
            return
        log.info("replica %d: %s -> draining", replica.replica_id, replica.state)
        # Not ready yet: no gateway sends it anything, so no pause before the signal.
        delay_s = self.settings.drain_delay_s if replica.state == "ready" else 0.0
        replica.state = "draining"
        replica.drain_started_at_s = now_s - (self.settings.drain_delay_s - delay_s)
        self._signal_when_due(replica, now_s)

    def _signal_when_due(self, replica: ManagedReplica, now_s: float) -> None:
        assert replica.drain_started_at_s is not None and replica.process is not None
        if not replica.signalled and \
                now_s - replica.drain_started_at_s >= self.settings.drain_delay_s:
            processes.signal_group(replica.process, signal.SIGTERM)
            replica.signalled = True

    def _kill(self, replica: ManagedReplica) -> None:
        if replica.process is not None:
            processes.signal_group(replica.process, signal.SIGKILL)
            replica.process.wait()

    def _answers(self, replica: ManagedReplica, path: str) -> bool:
        try:
            response = self._get(replica, path)
        except httpx.HTTPError:
            return False
        return response.status_code == httpx.codes.OK

    def _read_stats(self, replica: ManagedReplica) -> None:
        try:
            response = self._get(replica, STATS_PATH)
            raw = response.json() if response.status_code == httpx.codes.OK else None
        except (httpx.HTTPError, ValueError) as error:
            log.debug("replica %d: no stats: %s", replica.replica_id, error)
            return
        if isinstance(raw, dict):
            replica.stats, replica.counters = replica_stats.read_stats(raw, replica.counters)

    def _get(self, replica: ManagedReplica, path: str) -> httpx.Response:
        scheme = "https" if self._tls is not None else "http"
        url = f"{scheme}://{self.settings.connect_host}:{replica.port}{path}"
        return self._http.get(url, headers={"Authorization": f"Bearer {replica.replica_key}"})

    def _replica_dir(self, replica: ManagedReplica) -> Path:
        return self.settings.replicas_dir / str(replica.replica_id)
