"""Fakes for the worker agent's tests: NVML, a portal, and a replica server process.

`python -m tests.agent_fakes --artifact PATH --port N ...` runs the fake replica server;
what it does is read from its artifact file: `ready`, `crash`, `never-ready`, `slow-drain`,
`port-taken-once`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm_protocol import agent_messages as protocol
from swarm_protocol.agent_messages import DesiredReplica

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

FAKE_REPLICA_MODULE = "tests.agent_fakes"
JOIN_TOKEN = "join-me"
FAKE_STATS = {"in_flight": 2, "queue_depth": 1, "completed": 7, "failed": 1,
              "latency_p50_ms": 1.5, "latency_p99_ms": 9.25, "batches": 5, "batched_rows": 9}
FAKE_DRAIN_S = 0.3
DEMO_SIGNATURE = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}],
}


def worker_ports(ports: range) -> range:
    """Return this pytest-xdist worker's share of `ports` (all of it outside xdist).

    Tests of one file run on both workers at once, each with fake replicas that answer the
    same key: with one range, a test's health probe could reach the other worker's replica
    on a port its own (still starting) replica was about to take, and call it ready.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return ports
    share = len(ports) // count
    start = ports.start + int(worker[2:]) * share
    return range(start, start + share)


def replica_key_of(node_id: int) -> str:
    """Return the fake portal's replica key for a node (16+ characters, as replicas want)."""
    return f"fake-replica-key-for-node-{node_id}"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def desired_replica(replica_id: int, artifact: bytes, **overrides: Any) -> DesiredReplica:
    """Return a DesiredReplica for `artifact` with small defaults."""
    values: dict[str, Any] = {
        "replica_id": replica_id, "model_name": "demo-mlp", "version": 1,
        "sha256": sha256_of(artifact), "size_bytes": len(artifact), "format": "torchscript",
        "signature": DEMO_SIGNATURE, "max_batch_size": 8, "max_queue_delay_ms": 2.0,
        "device": "cpu", "threads": 1,
    }
    values.update(overrides)
    return DesiredReplica(**values)


# --- NVML -----------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


class FakeNVMLNotSupported(FakeNVMLError):
    pass


@dataclass
class FakeGpu:
    name: str | bytes
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_pct: int
    temperature_c: int | None = 50  # None: NVML says "not supported"
    power_mw: int | None = 150_000  # None: NVML says "not supported"


@dataclass
class _Struct:
    total: int = 0
    used: int = 0
    gpu: int = 0


class FakeNvml:
    """Stands in for the pynvml module: the same function names, canned answers."""

    NVMLError = FakeNVMLError
    NVMLError_NotSupported = FakeNVMLNotSupported
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[FakeGpu], init_fails: bool = False) -> None:
        self.gpus = gpus
        self.init_fails = init_fails
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str | bytes:
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> _Struct:
        return _Struct(total=gpu.memory_total_bytes, used=gpu.memory_used_bytes)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> _Struct:
        return _Struct(gpu=gpu.utilization_pct)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        if gpu.temperature_c is None:
            raise FakeNVMLNotSupported("Not Supported")
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        if gpu.power_mw is None:
            raise FakeNVMLNotSupported("Not Supported")
        return gpu.power_mw


# --- Portal ---------------------------------------------------------------------------------


class FakeNodeCa:
    """The portal's node CA, for agents with TLS on: signs each joining node's CSR for its
    address, as the real one (serving/node_ca.py) does at registration."""

    def __init__(self) -> None:
        # Imported here: the fake replica server (this module's __main__) never needs them.
        from tests.certs import certificate, new_key, pem

        self._key: ec.EllipticCurvePrivateKey = new_key()
        self._certificate = certificate(self._key.public_key(), self._key, "fake node CA",
                                        ca=True, path_length=0)
        self.certificate_pem = pem(self._certificate)

    def sign(self, csr_pem: str, address: str) -> str:
        """Return the PEM certificate for the CSR's key, named for `address`."""
        from cryptography import x509

        from tests.certs import certificate, pem

        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid, "the CSR is not signed by its own key"
        return pem(certificate(csr.public_key(), self._key, "node",
                               issuer=self._certificate.subject, sans=[address]))


@dataclass
class FakePortalState:
    join_token: str = JOIN_TOKEN
    heartbeat_interval_s: float = 0.2
    unavailable: bool = False  # every call answers 503
    secrets: dict[str, int] = field(default_factory=dict)  # node secret -> node id
    desired: dict[int, list[DesiredReplica]] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes served
    header_override: dict[str, str | None] = field(default_factory=dict)  # None: no header
    registrations: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    deregistered: list[int] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    node_ca: FakeNodeCa | None = None  # set: registrations with a CSR get a certificate


class FakePortal:
    """The portal's agent API on a real local HTTP server, in a thread."""

    def __init__(self) -> None:
        self.state = FakePortalState()
        self.lock = threading.Lock()
        self.on_deregister: Callable[[int], None] | None = None
        # Called with each registration's body (its join token accepted) before it is answered.
        self.on_register: Callable[[dict[str, Any]], None] | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _portal_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakePortal:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_artifact(self, data: bytes) -> str:
        sha256 = sha256_of(data)
        self.state.artifacts[sha256] = data
        return sha256

    def revoke(self, node_id: int) -> None:
        with self.lock:
            self.state.secrets = {s: n for s, n in self.state.secrets.items() if n != node_id}

    def replica_states(self, node_id: int) -> dict[int, str]:
        """Return {replica_id: state} from the node's latest heartbeat."""
        with self.lock:
            latest = [body for node, body in self.state.heartbeats if node == node_id]
        return {r["replica_id"]: r["state"] for r in latest[-1]["replicas"]} if latest else {}

    def replica_status(self, node_id: int, replica_id: int) -> dict[str, Any] | None:
        with self.lock:
            latest = [body for node, body in self.state.heartbeats if node == node_id]
        for replica in latest[-1]["replicas"] if latest else []:
            if replica["replica_id"] == replica_id:
                return dict(replica)
        return None


def _portal_handler(portal: FakePortal) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            if portal.state.unavailable:
                return self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "down"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            routes = {protocol.REGISTER_PATH: self._register,
                      protocol.HEARTBEAT_PATH: self._heartbeat,
                      protocol.DEREGISTER_PATH: self._deregister}
            if self.path not in routes:
                return self._json(HTTPStatus.NOT_FOUND, {"error": "no such path"})
            return routes[self.path](body)

        def do_GET(self) -> None:
            prefix = protocol.ARTIFACT_PATH.split("{")[0]
            if portal.state.unavailable:
                return self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "down"})
            if not self.path.startswith(prefix):
                return self._json(HTTPStatus.NOT_FOUND, {"error": "no such path"})
            if self._node_id() is None:
                return self._json(HTTPStatus.UNAUTHORIZED, {"error": "bad node secret"})
            self._artifact(self.path.removeprefix(prefix))

        def _register(self, body: dict[str, Any]) -> None:
            request = protocol.RegisterRequest.from_dict(body)
            state = portal.state
            if request.join_token != state.join_token:
                return self._json(HTTPStatus.UNAUTHORIZED, {"error": "invalid join token"})
            if portal.on_register is not None:
                portal.on_register(body)
            with portal.lock:
                state.registrations.append(body)
                node_id = len(state.registrations)
                secret = f"swn_{node_id}_{os.urandom(8).hex()}"
                state.secrets[secret] = node_id
            tls = {}
            if state.node_ca is not None and request.csr_pem:
                tls = {"certificate_pem": state.node_ca.sign(request.csr_pem, request.address),
                       "ca_certificate_pem": state.node_ca.certificate_pem}
            return self._json(HTTPStatus.CREATED, protocol.RegisterResponse(
                node_id=node_id, node_secret=secret, replica_key=replica_key_of(node_id),
                heartbeat_interval_s=state.heartbeat_interval_s, **tls).to_dict())

        def _heartbeat(self, body: dict[str, Any]) -> None:
            node_id = self._node_id()
            if node_id is None:
                return self._json(HTTPStatus.UNAUTHORIZED, {"error": "bad node secret"})
            protocol.HeartbeatRequest.from_dict(body)  # the agent must send the agreed shape
            with portal.lock:
                portal.state.heartbeats.append((node_id, body))
                desired = list(portal.state.desired.get(node_id, []))
            return self._json(HTTPStatus.OK, protocol.HeartbeatResponse(
                desired=desired, replica_key=replica_key_of(node_id),
                heartbeat_interval_s=portal.state.heartbeat_interval_s).to_dict())

        def _deregister(self, _body: dict[str, Any]) -> None:
            node_id = self._node_id()
            if node_id is None:
                return self._json(HTTPStatus.UNAUTHORIZED, {"error": "bad node secret"})
            if portal.on_deregister is not None:
                portal.on_deregister(node_id)
            with portal.lock:
                portal.state.deregistered.append(node_id)
            self.send_response(HTTPStatus.NO_CONTENT)
            self.end_headers()

        def _artifact(self, sha256: str) -> None:
            data = portal.state.artifacts.get(sha256)
            if data is None:
                return self._json(HTTPStatus.NOT_FOUND, {"error": "no such artifact"})
            with portal.lock:
                portal.state.downloads.append(sha256)
            self.send_response(HTTPStatus.OK)
            header = portal.state.header_override.get(sha256, sha256)
            if header is not None:
                self.send_header("X-Artifact-SHA256", header)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for start in range(0, len(data), 4096):
                    self.wfile.write(data[start:start + 4096])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the agent hung up on seeing a wrong header: what it should do

        def _node_id(self) -> int | None:
            secret = self.headers.get("Authorization", "").removeprefix("Bearer ")
            with portal.lock:
                return portal.state.secrets.get(secret)

        def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


# --- Replica server -------------------------------------------------------------------------


def _replica_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    for name in ("artifact", "format", "model-name", "model-version", "signature-file", "host",
                 "port", "max-batch-size", "max-queue-delay-ms", "device", "threads"):
        parser.add_argument(f"--{name}", required=True)
    return parser.parse_args(argv)


def fake_replica_main(argv: list[str]) -> int:
    """Serve the replica contract (health, stats, key check, SIGTERM drain) without a model."""
    args = _replica_args(argv)
    mode = Path(args.artifact).read_text().strip()
    key = os.environ.get("SWARM_REPLICA_KEY", "")
    Path("launch.json").write_text(json.dumps({"argv": argv, "key": key}))
    if mode == "port-taken-once" and not Path("clashed").exists():
        Path("clashed").write_text("once")  # the next launch (this folder) serves
        # uvicorn's own words, as the real replica server prints them on a taken port
        print("ERROR:    [Errno 98] error while attempting to bind on address "
              f"('{args.host}', {args.port}): address already in use", file=sys.stderr)
        return 1
    if mode == "crash":
        print("Traceback (most recent call last):", file=sys.stderr)
        print("RuntimeError: fake replica cannot load its model", file=sys.stderr)
        return 3
    status = {"state": "loading" if mode == "never-ready" else "ready", **FAKE_STATS}
    server = ThreadingHTTPServer((args.host, int(args.port)), _replica_handler(key, status))
    signal.signal(signal.SIGTERM, _drain_handler(server, status, mode))
    print(f"REPLICA READY port={args.port}", flush=True)
    server.serve_forever(poll_interval=0.05)
    Path("drained").write_text("ok")
    return 0


def _drain_handler(server: ThreadingHTTPServer, status: dict[str, Any], mode: str) -> Any:
    def on_sigterm(_signum: int, _frame: Any) -> None:
        status["state"] = "draining"
        if mode == "slow-drain":
            return  # never finishes: the agent must kill it after its grace period
        threading.Timer(FAKE_DRAIN_S, server.shutdown).start()

    return on_sigterm


def _replica_handler(key: str, status: dict[str, Any]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {key}":
                return self._json(HTTPStatus.UNAUTHORIZED, {"error": "bad replica key"})
            if self.path == "/v2/health/ready":
                ready = status["state"] == "ready"
                return self._json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, {})
            if self.path == "/stats":
                return self._json(HTTPStatus.OK, status)
            return self._json(HTTPStatus.NOT_FOUND, {"error": "no such path"})

        def _json(self, code: HTTPStatus, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


if __name__ == "__main__":
    sys.exit(fake_replica_main(sys.argv[1:]))
