"""Helpers for the gateway tests: real replica fleets, tables, and gateways to run them.

`shared_fleet` starts the replicas once per test session (several modules use them; a
session fixture imported into each module would start them once per module) and stops
them when the session ends. Tests must not break the shared replicas: the ones that kill
replicas start their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
import uvloop

from serving.gateway.app import GatewayApp
from serving.gateway.routes import (
    ApiKeyRoute,
    DeploymentRoute,
    ReplicaRoute,
    RouteTable,
    VersionInfo,
)
from tests.replica_models import (
    KEY,
    MLP_SIGNATURE,
    REPO_ROOT,
    SLOW_SIGNATURE,
    ReplicaProcess,
    build_slow_model,
    build_tabular_mlp,
    free_port,
    replica_command,
    save_torchscript,
    wait_until_ready,
)
from tests.waiting import wait_until

DEADLINE_S = 30.0
MLP, SLOW = "tabular", "slow"
SLOW_ITERATIONS = 3000  # about 0.3-0.6 s per request here: long enough to act mid-request
MLP_INFO = VersionInfo("pytorch_torchscript", MLP_SIGNATURE["inputs"], MLP_SIGNATURE["outputs"])
SLOW_INFO = VersionInfo("pytorch_torchscript", SLOW_SIGNATURE["inputs"],
                        SLOW_SIGNATURE["outputs"])
SECRET = "swk_test_secret_all"  # an API key for every deployment
# Read-only: tritonclient writes its own headers into the dict it is given.
BEARER: Mapping[str, str] = MappingProxyType({"Authorization": f"Bearer {SECRET}"})


def wait_for(condition: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """Return the first truthy value of `condition()`; fail after the deadline."""
    return wait_until(condition, deadline_s, what, interval_s=0.01)


async def eventually(check: Callable[[], Any], what: str,
                     deadline_s: float = DEADLINE_S) -> Any:
    """Return the first truthy result of `check()` (awaited if need be); fail after the
    deadline, without blocking the event loop."""
    give_up_at = time.monotonic() + deadline_s
    while time.monotonic() < give_up_at:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")


# replicas


def start_replicas(directory: Path, specs: Iterable[tuple[Path, dict[str, Any], dict[str, Any]]],
                   ) -> list[ReplicaProcess]:
    """Start replicas (artifact, signature, options) side by side; return them once ready."""
    started: list[ReplicaProcess] = []
    try:
        for index, (artifact, signature, options) in enumerate(specs):
            started.append(launch_replica(directory, artifact, signature,
                                          port=options.pop("port", None) or free_port(),
                                          tag=str(index), **options))
        for replica in started:
            wait_until_ready(replica)
            assert replica.process.stdout is not None
            replica.ready_line = replica.process.stdout.readline().strip()
    except BaseException:
        for replica in started:
            replica.stop()
        raise
    return started


def launch_replica(directory: Path, artifact: Path, signature: dict[str, Any], *, port: int,
                   tag: str, **options: Any) -> ReplicaProcess:
    """Start one replica process on `port` without waiting for it."""
    signature_path = directory / f"{artifact.stem}-signature.json"
    signature_path.write_text(json.dumps(signature))
    stderr_path = directory / f"{artifact.stem}-{tag}-{port}.stderr"
    env = {**os.environ, "SWARM_REPLICA_KEY": KEY}
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            replica_command(artifact, "torchscript", signature_path, port, **options),
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    return ReplicaProcess(process, port, stderr_path)


def mlp_artifact(directory: Path) -> Path:
    """Write the tabular MLP once per directory; return its path."""
    path = directory / "mlp.pt"
    if not path.exists():
        save_torchscript(build_tabular_mlp(seed=0), path)
    return path


@dataclass
class Fleet:
    """The shared replicas: two of tabular v1, one of tabular v2, one slow model."""

    directory: Path
    mlp_v1: list[ReplicaProcess]
    mlp_v2: ReplicaProcess
    slow: ReplicaProcess


def shared_fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Fleet:
    """Return the session's shared fleet, starting it on first use."""
    fleet: Fleet | None = getattr(request.config, "_gateway_fleet", None)
    if fleet is not None:
        return fleet
    directory = tmp_path_factory.mktemp("gateway-fleet")
    mlp = mlp_artifact(directory)
    slow = save_torchscript(build_slow_model(SLOW_ITERATIONS), directory / "slow.pt")
    mlp_options = {"name": MLP, "max_batch_size": 8, "max_queue_delay_ms": 1.0}
    a, b, c, s = start_replicas(directory, [
        (mlp, MLP_SIGNATURE, {**mlp_options, "version": 1}),
        (mlp, MLP_SIGNATURE, {**mlp_options, "version": 1}),
        (mlp, MLP_SIGNATURE, {**mlp_options, "version": 2}),
        (slow, SLOW_SIGNATURE, {"name": SLOW, "version": 1}),
    ])
    fleet = Fleet(directory, [a, b], c, s)
    request.config._gateway_fleet = fleet  # type: ignore[attr-defined]
    request.config.add_cleanup(lambda: [r.stop() for r in (a, b, c, s)])
    return fleet


def completed(replica: ReplicaProcess) -> int:
    """Return how many inference requests the replica has completed."""
    with replica.client(timeout=5) as client:
        return int(client.get("/stats").json()["completed"])


# tables


def api_key(secret: str, key_id: int, deployments: Iterable[str] | None = None,
            **options: Any) -> ApiKeyRoute:
    """Return the table entry of an API key."""
    return ApiKeyRoute(key_id=key_id, digest=hashlib.sha256(secret.encode()).hexdigest(),
                       deployments=None if deployments is None else frozenset(deployments),
                       expires_at_s=options.pop("expires_at_s", None),
                       rate_limit_rps=options.pop("rate_limit_rps", None), **options)


def replica_route(replica: ReplicaProcess | int, replica_id: int, version: int = 1,
                  draining: bool = False) -> ReplicaRoute:
    """Return the table entry of a replica (a process, or a port for a fake or dead one)."""
    port = replica if isinstance(replica, int) else replica.port
    return ReplicaRoute(replica_id, "127.0.0.1", port, KEY, version, draining)


def deployment(name: str, replicas: Iterable[ReplicaRoute], weights: dict[int, float] | None = None,
               info: VersionInfo = MLP_INFO, **options: Any) -> DeploymentRoute:
    """Return a deployment route; every weighted version gets `info`."""
    weights = weights or {1: 1.0}
    replicas = tuple(replicas)
    versions = {v: info for v in {*weights, *(r.version for r in replicas)}}
    return DeploymentRoute(name=name, deployment_id=abs(hash(name)) % 10_000, weights=weights,
                           versions=versions, replicas=replicas, **options)


def table(*deployments: DeploymentRoute, keys: Iterable[ApiKeyRoute] = (),
          revision: str = "1") -> RouteTable:
    """Return a routing table; the all-deployments test key is always in it."""
    all_keys = [api_key(SECRET, 1), *keys]
    return RouteTable(revision, {d.name: d for d in deployments},
                      {k.digest: k for k in all_keys})


class MemoryTableSource:
    """A TableSource over a table held in memory; `set` publishes a new one."""

    def __init__(self, initial: RouteTable) -> None:
        self._table = initial
        self._revision = 0
        self.loads = 0

    def set(self, new: RouteTable) -> None:
        self._table = new
        self._revision += 1

    async def revision(self) -> str:
        return str(self._revision)

    async def load(self) -> RouteTable:
        self.loads += 1
        return self._table


# requests


def mlp_request(rows: np.ndarray) -> dict[str, Any]:
    """Return a JSON inference request for the tabular MLP."""
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.ravel().tolist()}]}


def slow_request() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.5] * 4}]}


def features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 4)).astype(np.float32)


def expected_scores(rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return build_tabular_mlp(seed=0)(torch.from_numpy(rows)).numpy()


# gateways


class GatewayThread:
    """A GatewayApp served by uvicorn on a real socket, in a thread with its own loop.

    `http`: uvicorn's protocol (or the lean one: fast_http.protocol_class); `asgi_app`: what
    uvicorn serves, when not `app` itself (the pass-through app).
    """

    def __init__(self, app: GatewayApp, http: Any = "httptools", asgi_app: Any = None) -> None:
        self.app = app
        config = uvicorn.Config(asgi_app or app, host="127.0.0.1", port=0, loop="none",
                                http=http, lifespan="off", access_log=False,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self.port = 0

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self.server.serve())

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        wait_for(lambda: self.server.started, "the gateway to listen", 30)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=BEARER, timeout=30, **kwargs)


class StandaloneGateway:
    """`python -m serving.gateway.standalone` in a subprocess, on a free port."""

    def __init__(self, table_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "serving.gateway.standalone", "--table",
                   str(table_path), "--port", "0", *args]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, **(env or {})})
        self.port = self._read_port()

    def _read_port(self) -> int:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], DEADLINE_S)
        line = self.process.stdout.readline().strip() if ready else ""
        if not line.startswith("GATEWAY READY port="):
            self.stop()
            raise AssertionError(f"the gateway did not start: {line!r}")
        return int(line.rsplit("=", 1)[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Return the value of one sample in Prometheus text (0.0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in sample for k, v in labels.items()):
            return float(value)
    return 0.0
