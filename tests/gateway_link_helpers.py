"""Helpers for tests/test_gateway_link.py: routing rows in the test database, the tasks sent
to the broker, and a replica that takes the portal's replica key for its node."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx

from registry.demo import DEMO_SIGNATURE
from registry.models import ModelVersion
from serving import services
from serving.models import Deployment, Node, Replica, ReplicaState
from serving.secrets import replica_key
from tests.replica_models import REPO_ROOT, ReplicaProcess, free_port, replica_command


def gateway_rows(operator: Any, version: ModelVersion, *, deployments: int, keys: int,
                 caps: list[tuple[int, int]] | None = None) -> list[Deployment]:
    """Create deployments of `version` with two ready replicas each on a new node, and
    API keys scoped to the first two; return the deployments."""
    node = Node.objects.create(name=f"n{Node.objects.count()}", address="127.0.0.1",
                               secret_hash="0" * 64)
    first = Deployment.objects.count()
    caps = caps or [(64, 256)] * deployments
    created = [Deployment.objects.create(
        name=f"d{first + i}", model=version.model, version=version, created_by=operator,
        max_in_flight_per_replica=cap, queue_limit=limit) for i, (cap, limit) in enumerate(caps)]
    for index, row in enumerate(created):
        for offset in (0, 1):
            Replica.objects.create(deployment=row, version=version, node=node,
                                   port=9000 + 2 * index + offset, state=ReplicaState.READY)
    for index in range(keys):
        services.do_create_api_key(name=f"k{index}", user=operator,
                                   deployments=[d.name for d in created[:2]],
                                   expires_in=None, rate_limit_rps=None)
    return created


def sent_tasks() -> list[tuple[str, list[Any]]]:
    """Take every task message waiting in the broker's default queue: [(name, args)]."""
    from swarm_portal.celery import app

    taken: list[tuple[str, list[Any]]] = []
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("celery")
        try:
            while True:
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    return taken
                taken.append((message.headers["task"], message.payload[0]))
                message.ack()
        finally:
            queue.close()


def start_node_replica(node: Node, artifact: Path, directory: Path) -> ReplicaProcess:
    """Start a replica of the demo MLP ("mlp", version 1) that takes the node's replica key."""
    signature = directory / "signature.json"
    signature.write_text(json.dumps(DEMO_SIGNATURE))
    port = free_port()
    stderr_path = directory / f"replica-{port}.stderr"
    env = {**os.environ, "SWARM_REPLICA_KEY": replica_key(node.pk)}
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            replica_command(artifact, "torchscript", signature, port, name="mlp", version=1),
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    return ReplicaProcess(process, port, stderr_path)


def replica_ready(replica: ReplicaProcess, node: Node) -> bool:
    """Return whether the replica answers ready to the node's replica key."""
    if replica.process.poll() is not None:
        raise AssertionError(f"the replica exited:\n{replica.stderr()}")
    try:
        return httpx.get(f"{replica.url}/v2/health/ready", timeout=1, headers={
            "Authorization": f"Bearer {replica_key(node.pk)}"}).status_code == 200
    except httpx.HTTPError:
        return False
