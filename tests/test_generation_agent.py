"""The worker agent launches an hf_causal_lm replica like any other format, and it generates.

The agent's replica manager downloads the tiny LM's archive from a fake portal, starts the
real replica server (`python -m serving.replica --format hf_causal_lm`) and waits for it
to be ready; the generate endpoint then answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from registry.demo_lm import cached_tiny_lm_archive
from serving.agent.cache import ArtifactCache
from serving.agent.client import PortalClient
from serving.agent.replicas import ReplicaManager, ReplicaSettings
from swarm_protocol.archive_hf import TEXT_SIGNATURE
from tests.agent_fakes import FakePortal, desired_replica
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
KEY = "a-replica-key-of-32-characters!!"
PORTS = range(19640, 19660)
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
