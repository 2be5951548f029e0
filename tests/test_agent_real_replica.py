"""The replica manager running the REAL replica server (`python -m serving.replica`): a
TorchScript model, and the tiny LM (hf_causal_lm) generating and streaming."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from registry.demo import DEMO_SIGNATURE, save_torchscript
from registry.demo_lm import cached_tiny_lm_archive
from serving.agent.cache import ArtifactCache
from serving.agent.client import PortalClient
from serving.agent.replicas import ReplicaManager, ReplicaSettings
from swarm_protocol.archive_hf import TEXT_SIGNATURE
from tests.agent_fakes import FakePortal, desired_replica
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
KEY = "a-replica-key-of-32-characters!!"  # the replica wants at least 16 characters
PORTS = range(19600, 19620)
READY_TIMEOUT_S = 120.0


@pytest.fixture
def portal() -> Iterator[FakePortal]:
    with FakePortal() as running:
        running.state.secrets["swn_1_real"] = 1
        yield running


@pytest.fixture
def manager(portal: FakePortal, tmp_path: Path) -> Iterator[ReplicaManager]:
    cache = ArtifactCache(tmp_path / "cache",
                          PortalClient(portal.url, timeout_s=10.0, node_secret="swn_1_real"))
    executor = ThreadPoolExecutor(1)
    settings = ReplicaSettings(replicas_dir=tmp_path / "replicas", port_range=PORTS,
                               ready_timeout_s=READY_TIMEOUT_S, drain_grace_s=30.0)
    created = ReplicaManager(settings, lambda d: cache.ensure(d.sha256, d.size_bytes), executor)
    yield created
    created.drain_all(time.monotonic())
    wait_until(lambda: created.step(time.monotonic()) or created.live_count() == 0,
               timeout_s=40, what="replicas to stop")
    created.close()
    executor.shutdown()


def step_until(manager: ReplicaManager, replica_id: int, state: str, timeout_s: float) -> None:
    def reached() -> bool:
        manager.step(time.monotonic())
        return manager.replicas[replica_id].state in (state, "failed")
    wait_until(reached, timeout_s=timeout_s, what=f"replica {replica_id} to be {state}")
    replica = manager.replicas[replica_id]
    assert replica.state == state, replica.error


def test_a_real_replica_starts_from_a_repaired_cache_serves_reports_and_drains(
        portal: FakePortal, manager: ReplicaManager, tmp_path: Path) -> None:
    artifact = save_torchscript(tmp_path / "demo.pt").read_bytes()
    sha256 = portal.add_artifact(artifact)
    corrupted = bytearray(artifact)
    corrupted[len(corrupted) // 2] ^= 0xFF
    cache_dir = tmp_path / "cache" / "artifacts"
    (cache_dir / sha256).write_bytes(bytes(corrupted))  # flipped bytes on disk

    manager.reconcile([desired_replica(21, artifact, signature=DEMO_SIGNATURE,
                                       max_batch_size=4, max_queue_delay_ms=1.0)],
                      KEY, time.monotonic())
    step_until(manager, 21, "ready", READY_TIMEOUT_S)

    assert portal.state.downloads == [sha256]  # the corrupt copy was replaced, not served
    assert (cache_dir / sha256).read_bytes() == artifact
    replica = manager.replicas[21]
    base = f"http://127.0.0.1:{replica.port}"
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [2, 4],
                        "data": [0.1, 0.2, 0.3, 0.4, 1, 2, 3, 4]}]}
    answer = httpx.post(f"{base}/v2/models/demo-mlp/infer", json=body, timeout=10,
                        headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["shape"] == [2, 3]
    assert httpx.get(f"{base}/stats", timeout=5).status_code == 401  # the key is required

    manager.refresh_stats()
    [status] = manager.statuses()
    assert status.state == "ready" and status.completed >= 1
    assert status.latency_p50_ms is not None

    manager.reconcile([], KEY, time.monotonic())
    assert manager.replicas[21].state == "draining"
    step_until(manager, 21, "stopped", 40)
    assert replica.process is not None and replica.process.returncode == 0
    assert replica.error == ""


def test_the_agent_starts_a_generative_replica_that_streams(portal, manager, tmp_path):
    artifact = cached_tiny_lm_archive(tmp_path / "demo").read_bytes()
    portal.add_artifact(artifact)
    manager.reconcile([desired_replica(31, artifact, model_name="tiny-lm",
                                       format="hf_causal_lm", signature=TEXT_SIGNATURE)],
                      KEY, time.monotonic())

    def ready() -> bool:
        manager.step(time.monotonic())
        return manager.replicas[31].state in ("ready", "failed")

    wait_until(ready, timeout_s=READY_TIMEOUT_S, what="the generative replica to be ready")
    replica = manager.replicas[31]
    assert replica.state == "ready", replica.error
    base = f"http://127.0.0.1:{replica.port}/v2/models/tiny-lm"
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = httpx.post(f"{base}/generate", headers=headers, timeout=60,
                        json={"text_input": "Hello, world.", "max_tokens": 5,
                              "ignore_eos": True})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 5
    with httpx.stream("POST", f"{base}/generate_stream", headers=headers, timeout=60,
                      json={"text_input": "Hello, world.", "max_tokens": 5,
                            "ignore_eos": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert '"finish_reason": "length"' in events[-1]
