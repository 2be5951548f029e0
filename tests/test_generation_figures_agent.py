"""Generation figures, agent side: a generative replica's /stats become ReplicaStatus fields.

The pure reading (replica_stats) is tested on crafted replies, including those of older or
broken replicas; then the agent's ReplicaManager runs the REAL replica server with the tiny
LM and its heartbeat status carries running sequences, KV-cache use and tokens per second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from registry.demo_lm import cached_tiny_lm_archive
from serving.agent.cache import ArtifactCache
from serving.agent.client import PortalClient
from serving.agent.replica_stats import Counters, parse_generation, read_stats
from serving.agent.replicas import ReplicaManager, ReplicaSettings
from swarm_protocol.agent_messages import GENERATION_FIELDS, ProtocolError, ReplicaStatus
from swarm_protocol.archive_hf import TEXT_SIGNATURE
from tests.agent_fakes import FakePortal, desired_replica
from tests.waiting import wait_until

KEY = "a-replica-key-of-32-characters!!"
PORTS = range(19660, 19680)  # no other test uses these
READY_TIMEOUT_S = 120.0
ENGINE = {"running": 3, "waiting": 2, "cache_tokens_used": 100, "cache_tokens_reserved": 512,
          "cache_tokens_limit": 2048, "admitted": 9, "finished": 4, "cancelled": 0,
          "prompt_tokens": 80, "generated_tokens": 1000, "steps": 300,
          "ttft_ms_p50": 12.5, "ttft_ms_p99": 40.0, "itl_ms_p50": 4.25, "itl_ms_p99": 9.0,
          "queue_ms_p50": 1.0, "queue_ms_p99": 3.0}


def stats(clock_s: float, **generation: object) -> dict[str, object]:
    return {"in_flight": 5, "clock_s": clock_s, "in_flight_seconds": clock_s / 2,
            "generation": {**ENGINE, **generation}}


def test_the_engine_counts_become_status_fields():
    figures = parse_generation(ENGINE)
    assert figures == {"running_sequences": 3, "waiting_sequences": 2, "kv_cache_usage": 0.25,
                       "ttft_p50_ms": 12.5, "ttft_p99_ms": 40.0, "itl_p50_ms": 4.25,
                       "itl_p99_ms": 9.0, "queue_p50_ms": 1.0}
    status = ReplicaStatus(replica_id=7, state="ready", **figures)
    assert ReplicaStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status


def test_tokens_per_second_come_from_the_counter_between_two_polls():
    first, counters = read_stats(stats(100.0, generated_tokens=1000), Counters())
    assert "tokens_per_s" not in first  # nothing to compare with yet
    second, counters = read_stats(stats(102.0, generated_tokens=1250), counters)
    assert second["tokens_per_s"] == 125.0
    assert second["mean_in_flight"] == 0.5
    # A restarted replica counts from zero again: no figure rather than a wrong one.
    third, _ = read_stats(stats(103.0, generated_tokens=10), counters)
    assert "tokens_per_s" not in third


def test_an_older_or_broken_replica_leaves_figures_out_instead_of_failing_the_heartbeat():
    assert parse_generation(None) == {}  # a replica without an engine, or an older one
    old, _ = read_stats({"in_flight": 1, "generation": {"running": 1, "waiting": 0}},
                        Counters())
    assert old == {"in_flight": 1, "running_sequences": 1, "waiting_sequences": 0}
    broken = parse_generation({"running": -1, "waiting": True, "cache_tokens_reserved": 5,
                               "cache_tokens_limit": 0, "ttft_ms_p50": None,
                               "itl_ms_p50": "7", "itl_ms_p99": -3.0, "queue_ms_p50": 1e400})
    figures, _ = read_stats({"generation": broken}, Counters())
    assert figures == {}
    # Reserved beyond the budget (a budget lowered under a live engine): at most full.
    assert parse_generation({"cache_tokens_reserved": 3000,
                             "cache_tokens_limit": 2048})["kv_cache_usage"] == 1.0


def test_the_portal_refuses_generation_figures_out_of_their_bounds():
    base = {"replica_id": 1, "state": "ready"}
    for name, value in [("kv_cache_usage", 1.5), ("running_sequences", -1),
                        ("tokens_per_s", -0.1), ("ttft_p99_ms", float("nan")),
                        ("waiting_sequences", 2**31)]:
        with pytest.raises(ProtocolError, match=name):
            ReplicaStatus.from_dict({**base, name: value})


def test_old_agents_and_old_portals_still_understand_each_other():
    old_agent = ReplicaStatus.from_dict({"replica_id": 1, "state": "ready", "in_flight": 2})
    assert all(getattr(old_agent, name) is None for name in GENERATION_FIELDS)
    # An older portal knows fewer fields: from_dict ignores the ones it does not know.
    newer = {"replica_id": 1, "state": "ready", "running_sequences": 4, "a_later_field": 1}
    assert ReplicaStatus.from_dict(newer).running_sequences == 4


# --- a real replica process -----------------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[ReplicaManager, FakePortal]]:
    with FakePortal() as portal:
        portal.state.secrets["swn_1_real"] = 1
        cache = ArtifactCache(tmp_path / "cache", PortalClient(
            portal.url, timeout_s=10.0, node_secret="swn_1_real"))
        executor = ThreadPoolExecutor(1)
        settings = ReplicaSettings(replicas_dir=tmp_path / "replicas", port_range=PORTS,
                                   ready_timeout_s=READY_TIMEOUT_S, drain_grace_s=30.0)
        created = ReplicaManager(settings, lambda d: cache.ensure(d.sha256, d.size_bytes),
                                 executor)
        try:
            yield created, portal
        finally:
            created.drain_all(time.monotonic())
            wait_until(lambda: created.step(time.monotonic()) or created.live_count() == 0,
                       timeout_s=40, what="replicas to stop")
            created.close()
            executor.shutdown()


@pytest.mark.slow
def test_a_generating_replica_reports_sequences_cache_use_and_tokens_per_second(
        manager, tmp_path):
    agent, portal = manager
    artifact = cached_tiny_lm_archive(tmp_path / "demo").read_bytes()
    portal.add_artifact(artifact)
    agent.reconcile([desired_replica(41, artifact, model_name="tiny-lm",
                                     format="hf_causal_lm", signature=TEXT_SIGNATURE)],
                    KEY, time.monotonic())

    def ready() -> bool:
        agent.step(time.monotonic())
        return agent.replicas[41].state in ("ready", "failed")

    wait_until(ready, timeout_s=READY_TIMEOUT_S, what="the generative replica to be ready")
    replica = agent.replicas[41]
    assert replica.state == "ready", replica.error
    agent.refresh_stats()
    [idle] = agent.statuses()
    assert (idle.running_sequences, idle.waiting_sequences) == (0, 0)
    assert idle.kv_cache_usage == 0.0

    url = f"http://127.0.0.1:{replica.port}/v2/models/tiny-lm/generate_stream"
    body = {"text_input": "Hello, world.", "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", url, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it generates

        def generating() -> ReplicaStatus | None:
            agent.refresh_stats()
            [status] = agent.statuses()
            busy = status.running_sequences == 1 and (status.tokens_per_s or 0) > 0
            return status if busy else None

        status = wait_until(generating, timeout_s=60, what="a running sequence's figures")
        assert status.waiting_sequences == 0
        assert status.kv_cache_usage is not None and 0 < status.kv_cache_usage <= 1
        # The status survives the wire: the portal's strict parser takes it.
        assert ReplicaStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status
        events = [line for line in lines if line.startswith("data: ")]  # read to the end
        assert '"finish_reason": "length"' in events[-1]

    raw = httpx.get(f"http://127.0.0.1:{replica.port}/stats", timeout=10,
                    headers={"Authorization": f"Bearer {KEY}"}).json()["generation"]
    agent.refresh_stats()
    [after] = agent.statuses()
    assert after.running_sequences == 0
    if "ttft_ms_p50" in raw:  # a replica that times its sequences (the last minute's)
        assert after.ttft_p50_ms is not None and after.ttft_p50_ms > 0
        assert after.itl_p50_ms is not None and after.itl_p50_ms > 0
        assert after.queue_p50_ms is not None
