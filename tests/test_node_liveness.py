"""Node liveness: late heartbeats from a slow portal are not missed ones; make before break.

The service tests pass `now` explicitly, so the heartbeats and sweeps of a minute take no
wall-clock time; the Redis test stops and restarts a real redis-server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.cache import cache
from django.test import Client
from django.utils import timezone

from serving import live, liveness, services
from serving.gateway_source import DatabaseTableSource, build_route_table
from serving.liveness import LivenessLimits, NodeEvidence, SweepClock
from serving.models import Deployment, Node, NodeStatus, Replica, ReplicaState
from swarm_protocol.agent_messages import HeartbeatRequest, ReplicaStatus
from tests import factories
from tests.conftest import free_port
from tests.dashboards_helpers import gpu, register_node
from tests.factories import add_version
from tests.test_e2e_workers import api_client, cluster, ready_replicas  # noqa: F401
from tests.waiting import wait_until

LIMITS = liveness.limits_for(interval_s=1.0, missed_heartbeats=3)
GIB = 1024**3


# The pure verdict.

def verdict(nodes: list[NodeEvidence], now_s: float, started_s: float = 0.0,
            limits: LivenessLimits = LIMITS) -> list[int]:
    return liveness.offline_nodes(nodes, SweepClock(started_s, now_s), now_s, limits)


def test_a_node_silent_while_others_heartbeat_is_missing():
    nodes = [NodeEvidence(1, last_heartbeat_s=100.0), NodeEvidence(2, last_heartbeat_s=104.0)]
    assert verdict(nodes, now_s=104.5) == [1]
    assert verdict(nodes, now_s=102.5) == []


def test_when_no_node_was_heard_the_portal_was_stalled_and_nobody_missed_anything():
    nodes = [NodeEvidence(1, last_heartbeat_s=100.0), NodeEvidence(2, last_heartbeat_s=100.2)]
    assert verdict(nodes, now_s=120.0) == []
    # Beyond the stall limit, silence counts again: a dead fleet is declared too.
    assert verdict(nodes, now_s=100.2 + LIMITS.portal_stall_s + LIMITS.missed_s + 1) == [1, 2]


def test_silence_counts_only_while_the_web_tier_took_gateway_polls():
    nodes = [NodeEvidence(1, last_heartbeat_s=100.0), NodeEvidence(2, last_heartbeat_s=100.2)]
    past_stall_s = 100.2 + LIMITS.portal_stall_s + LIMITS.missed_s + 1
    clock = SweepClock(0.0, past_stall_s)
    # The web tier took its last gateway poll when the heartbeats stopped: it was paused
    # (SIGSTOP, a frozen VM), not the nodes; silence counts only up to that poll.
    paused = SweepClock(started_s=50.0, last_s=100.3)
    assert liveness.offline_nodes(nodes, clock, past_stall_s, LIMITS, paused) == []
    # Gateways kept polling while no node was heard: the nodes are gone.
    polling = SweepClock(started_s=50.0, last_s=past_stall_s - 0.5)
    assert liveness.offline_nodes(nodes, clock, past_stall_s, LIMITS, polling) == [1, 2]
    # Polls that stopped later than the heartbeats count up to the last one.
    stopped = SweepClock(started_s=50.0, last_s=100.1 + LIMITS.missed_s)
    assert liveness.offline_nodes(nodes, clock, past_stall_s, LIMITS, stopped) == [1]
    # A web tier silent for longer than web_tier_forget_s is gone, not paused.
    long_gone_s = 100.3 + LIMITS.web_tier_forget_s + 1
    assert liveness.offline_nodes(nodes, SweepClock(0.0, long_gone_s), long_gone_s, LIMITS,
                                  paused) == [1, 2]
    # The web tier just came back from a pause: every node has its full grace again.
    resumed = SweepClock(started_s=past_stall_s - 1.0, last_s=past_stall_s)
    assert liveness.offline_nodes(nodes, clock, past_stall_s, LIMITS, resumed) == []


def test_a_node_late_after_the_web_tier_resumed_is_not_missing():
    """The web tier was paused 20 s (under the stall limit); it took one node's heartbeat
    as it resumed, and the sweep ran before the other's."""
    nodes = [NodeEvidence(1, last_heartbeat_s=100.0), NodeEvidence(2, last_heartbeat_s=120.1)]
    clock = SweepClock(0.0, 120.2)
    assert liveness.offline_nodes(nodes, clock, 120.2, LIMITS) == [1]  # without the figure
    resumed = SweepClock(started_s=120.0, last_s=120.1)
    assert liveness.offline_nodes(nodes, clock, 120.2, LIMITS, resumed) == []


def test_a_series_of_events_breaks_at_a_gap():
    series = liveness.advance_series(None, 10.0, gap_s=5.0)
    series = liveness.advance_series(series, 14.0, gap_s=5.0)
    assert series == SweepClock(started_s=10.0, last_s=14.0)
    assert liveness.advance_series(series, 19.5, gap_s=5.0) == SweepClock(19.5, 19.5)
    assert liveness.advance_series(series, 3.0, gap_s=5.0) == SweepClock(3.0, 3.0)


def test_a_node_with_ready_replicas_gets_a_longer_grace():
    other = NodeEvidence(2, last_heartbeat_s=110.0)
    serving = NodeEvidence(1, last_heartbeat_s=100.0, ready_replicas=6)
    assert LIMITS.ready_grace_s > LIMITS.missed_s
    assert verdict([serving, other], now_s=100.0 + LIMITS.missed_s + 1) == []
    other = NodeEvidence(2, last_heartbeat_s=100.0 + LIMITS.ready_grace_s + 1)
    assert verdict([serving, other], now_s=other.last_heartbeat_s) == [1]


def test_a_node_whose_replicas_still_answer_the_gateway_is_not_dead():
    now_s = 130.0
    late = NodeEvidence(1, last_heartbeat_s=100.0, ready_replicas=2, last_served_s=now_s - 1)
    other = NodeEvidence(2, last_heartbeat_s=now_s)
    assert verdict([late, other], now_s) == []
    stopped = NodeEvidence(1, last_heartbeat_s=100.0, ready_replicas=2, last_served_s=105.0)
    assert verdict([stopped, other], now_s) == [1]


def test_unknown_figures_are_not_missed_ones():
    """No figures at all (a cache that came back empty): silence counts from the series."""
    nodes = [NodeEvidence(1, last_heartbeat_s=None), NodeEvidence(2, last_heartbeat_s=130.0)]
    assert verdict(nodes, now_s=130.0, started_s=129.0) == []
    assert verdict(nodes, now_s=130.0, started_s=120.0) == [1]


def test_a_sweep_after_a_gap_starts_a_new_series():
    first = liveness.advance_clock(None, 10.0, LIMITS)
    assert first == SweepClock(10.0, 10.0)
    assert liveness.advance_clock(first, 11.0, LIMITS) == SweepClock(10.0, 11.0)
    late = 11.0 + LIMITS.sweep_gap_s + 0.1
    assert liveness.advance_clock(SweepClock(10.0, 11.0), late, LIMITS) == SweepClock(late, late)
    assert SweepClock.from_dict({"started_s": 1}) is None
    assert SweepClock.from_dict(None) is None


def test_the_verdict_is_pure():
    code = ("import sys, serving.liveness; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


# The sweep and reconcile, with the database.

@pytest.fixture
def fresh_sweep_clock() -> Iterator[None]:
    keys = [live.SWEEP_CLOCK_KEY, live.WEB_TIER_KEY]  # no gateway polled in these tests
    cache.delete_many(keys)
    yield
    cache.delete_many(keys)


def beat(node: Node, at: datetime, ready: list[Replica] = ()) -> list[int]:
    statuses = [ReplicaStatus(replica_id=r.pk, state="ready", port=9100 + i)
                for i, r in enumerate(ready)]
    reply = services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()], replicas=statuses),
                                  now=at)
    return [d.replica_id for d in reply.desired]


def sweep_every_second(start: datetime, seconds: int,
                       beating: list[Node] = ()) -> list[tuple[int, int]]:
    """Run the sweep once a second while `beating` nodes heartbeat (reporting their ready
    replicas); return the verdicts as (second, node id)."""
    gone = []
    for step in range(seconds + 1):
        at = start + timedelta(seconds=step)
        for node in beating:
            beat(node, at, list(Replica.objects.filter(node=node, state=ReplicaState.READY)))
        gone += [(step, pk) for pk in services.sweep_nodes(now=at)]
    return gone


def routed_replica_ids(deployment_name: str = "mlp") -> set[int]:
    table = build_route_table()
    return {r.replica_id for r in table.deployments[deployment_name].replicas}


@pytest.fixture
def two_nodes_six_ready(join_secret, model, operator, model_files, fresh_sweep_clock):
    """Node a runs six ready replicas of `mlp`; node b is empty; both heartbeat at t0."""
    a = register_node(join_secret, "a")
    version = add_version(model, operator, model_files["torchscript"])
    deployment = services.do_create_deployment(
        name="mlp", model=model, version_number=version.number, alias_name="", user=operator,
        replicas=6, memory_bytes=GIB)
    b = register_node(join_secret, "b")
    t0 = timezone.now()
    beat(a, t0, list(Replica.objects.filter(node=a)))
    beat(b, t0)
    ready = list(Replica.objects.filter(node=a, state=ReplicaState.READY))
    assert len(ready) == 6
    return {"a": a, "b": b, "t0": t0, "ready": ready, "deployment": deployment}


@pytest.mark.django_db(transaction=True)
def test_a_stalled_portal_takes_no_replica_out_of_service(two_nodes_six_ready):
    """No heartbeat processed for 20 s (the portal was busy): nobody missed anything."""
    nodes = two_nodes_six_ready
    assert sweep_every_second(nodes["t0"], 20) == []
    assert Node.objects.filter(status=NodeStatus.OFFLINE).count() == 0
    assert routed_replica_ids() == {r.pk for r in nodes["ready"]}


@pytest.mark.django_db(transaction=True)
def test_a_portal_paused_past_the_stall_limit_takes_no_node_offline(two_nodes_six_ready):
    """Neither heartbeats nor gateway polls reached the web tier for a minute (SIGSTOP):
    the sweep, still running in Celery, must not blame the nodes. Once the web tier takes
    gateway polls again, silence counts from then: a node that stays silent goes."""
    nodes, t0 = two_nodes_six_ready, two_nodes_six_ready["t0"]
    gateways = live.GatewayInstances()
    gateways.note("gw-1", t0.timestamp())
    assert sweep_every_second(t0, 60) == []
    assert Node.objects.filter(status=NodeStatus.OFFLINE).count() == 0
    back = t0 + timedelta(seconds=61)
    for step in range(int(LIMITS.ready_grace_s) + 2):  # the web tier takes polls again
        at = back + timedelta(seconds=step)
        gateways.note(f"gw-{step}", at.timestamp())
        beat(nodes["b"], at)  # b heartbeats again; a stays silent
        gone = services.sweep_nodes(now=at)
        if step <= LIMITS.ready_grace_s:
            assert gone == [], step  # a has its full grace from the web tier's return
    assert gone == [nodes["a"].pk]


@pytest.mark.django_db(transaction=True)
def test_a_sweep_that_was_itself_stalled_starts_counting_again(two_nodes_six_ready):
    """The whole machine froze: b's heartbeat is processed first, then a sweep, then a's."""
    nodes, t0 = two_nodes_six_ready, two_nodes_six_ready["t0"]
    assert services.sweep_nodes(now=t0) == []
    resumed = t0 + timedelta(seconds=20)
    beat(nodes["b"], resumed)
    assert services.sweep_nodes(now=resumed + timedelta(seconds=0.1)) == []
    beat(nodes["a"], resumed + timedelta(seconds=0.2), nodes["ready"])
    assert Node.objects.get(pk=nodes["a"].pk).status == NodeStatus.READY


@pytest.mark.django_db(transaction=True)
def test_an_offline_node_keeps_serving_until_its_replacements_are_ready(two_nodes_six_ready):
    nodes, t0 = two_nodes_six_ready, two_nodes_six_ready["t0"]
    a, b, old = nodes["a"], nodes["b"], {r.pk for r in nodes["ready"]}
    # a falls silent; b heartbeats every second. Ready replicas get the longer grace.
    gone = sweep_every_second(t0, int(LIMITS.ready_grace_s) + 2, beating=[b])
    assert gone == [(int(LIMITS.ready_grace_s) + 1, a.pk)]
    # Make before break: a's replicas still serve and stay routed while b starts six more.
    assert set(Replica.objects.filter(node=a, state=ReplicaState.READY, desired=True)
               .values_list("pk", flat=True)) == old
    assert routed_replica_ids() == old
    later = t0 + timedelta(seconds=LIMITS.ready_grace_s + 3)
    replacements = beat(b, later)
    assert len(replacements) == 6 and not set(replacements) & old
    # Five replacements ready: still short, so a's six stay.
    beat(b, later, list(Replica.objects.filter(pk__in=replacements[:5])))
    assert routed_replica_ids() == old | set(replacements[:5])
    beat(b, later + timedelta(seconds=1), list(Replica.objects.filter(pk__in=replacements)))
    assert routed_replica_ids() == set(replacements)
    assert not Replica.objects.filter(pk__in=old, desired=True).exists()


@pytest.mark.django_db(transaction=True)
def test_a_node_that_comes_back_keeps_its_replicas_and_the_replacements_scale_back(
        two_nodes_six_ready):
    nodes, t0 = two_nodes_six_ready, two_nodes_six_ready["t0"]
    a, b, old = nodes["a"], nodes["b"], {r.pk for r in nodes["ready"]}
    assert [pk for _, pk in sweep_every_second(t0, int(LIMITS.ready_grace_s) + 2,
                                               beating=[b])] == [a.pk]
    back = t0 + timedelta(seconds=LIMITS.ready_grace_s + 3)
    replacements = beat(b, back)
    beat(b, back, list(Replica.objects.filter(pk__in=replacements[:2])))  # two got ready
    assert set(beat(a, back + timedelta(seconds=0.5), nodes["ready"])) == old
    assert Node.objects.get(pk=a.pk).status == NodeStatus.READY
    wanted = Replica.objects.filter(deployment=nodes["deployment"], desired=True)
    assert wanted.count() == 6
    assert set(wanted.values_list("pk", flat=True)) == old  # replacements go, ready ones too
    assert beat(b, back + timedelta(seconds=1)) == []
    assert routed_replica_ids() >= old


# A real Redis that stops and comes back empty.

@pytest.fixture
def own_redis(settings, tmp_path: Path) -> Iterator[dict]:
    """A redis-server on a free port, used as the cache; `restart()` brings it back empty."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server on PATH")
    port = free_port()
    server: dict = {}

    def start() -> None:
        server["proc"] = subprocess.Popen(
            [binary, "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: redis_answers(port), 10, "redis-server to answer")

    def stop() -> None:
        server["proc"].terminate()
        server["proc"].wait(timeout=10)

    start()
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": f"redis://127.0.0.1:{port}/0",
                                   "KEY_PREFIX": "liveness-test"}}
    server.update(start=start, stop=stop)
    try:
        yield server
    finally:
        if server["proc"].poll() is None:
            stop()


def redis_answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.mark.django_db(transaction=True)
def test_a_cache_outage_is_a_503_then_unknown_not_missed(own_redis, join_secret):
    a, b = register_node(join_secret, "a"), register_node(join_secret, "b")
    agent = Client(raise_request_exception=False,
                   headers={"Authorization": f"Bearer {a.secret}"})
    body = HeartbeatRequest(devices=[gpu()], replicas=[]).to_dict()
    assert agent.post("/api/agent/heartbeat", body, content_type="application/json"
                      ).status_code == 200
    t0 = timezone.now()
    assert services.sweep_nodes(now=t0) == []

    own_redis["stop"]()
    refused = agent.post("/api/agent/heartbeat", body, content_type="application/json")
    assert refused.status_code == 503
    assert refused["Retry-After"] == "2"
    assert "cache" in refused.json()["error"]
    assert services.sweep_nodes(now=t0 + timedelta(seconds=5)) == []  # skipped, no error

    own_redis["start"]()  # back, empty: every figure and the sweep's clock are gone
    assert live.node_figures(a.pk) is None
    later = t0 + timedelta(seconds=60)
    beat(b, later)  # the portal takes heartbeats again; a's is still on its way
    assert services.sweep_nodes(now=later) == []
    assert Node.objects.filter(status=NodeStatus.OFFLINE).count() == 0
    assert agent.post("/api/agent/heartbeat", body, content_type="application/json"
                      ).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_replicas_a_gateway_still_gets_answers_from_keep_their_node_in_service(
        two_nodes_six_ready):
    """The gateway reports successes through its table source; the sweep reads them."""
    nodes, t0 = two_nodes_six_ready, two_nodes_six_ready["t0"]
    a, b = nodes["a"], nodes["b"]
    source = DatabaseTableSource()
    grace_s = int(LIMITS.ready_grace_s)
    for step in range(grace_s + 6):
        at = t0 + timedelta(seconds=step)
        beat(b, at)
        async_to_sync(source.report_successes)({nodes["ready"][0].pk: at.timestamp()})
        assert services.sweep_nodes(now=at) == []
    # The gateway stops getting answers too: the node is gone one grace later.
    last_served = t0 + timedelta(seconds=grace_s + 5)
    gone = sweep_every_second(last_served + timedelta(seconds=1), grace_s + 1, beating=[b])
    assert gone == [(grace_s, a.pk)]


@pytest.mark.django_db(transaction=True)
def test_a_deployment_deleted_while_its_node_is_offline_still_goes(two_nodes_six_ready):
    nodes, t0 = two_nodes_six_ready, two_nodes_six_ready["t0"]
    assert [pk for _, pk in sweep_every_second(t0, int(LIMITS.ready_grace_s) + 2,
                                               beating=[nodes["b"]])] == [nodes["a"].pk]
    services.do_delete_deployment(nodes["deployment"])
    beat(nodes["b"], t0 + timedelta(seconds=LIMITS.ready_grace_s + 3))  # b stops its share
    services.reconcile_all()
    assert not Deployment.objects.filter(pk=nodes["deployment"].pk).exists()


# Real processes: the portal paused while Celery keeps sweeping.

@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_paused_portal_takes_no_node_offline(cluster):  # noqa: F811 - the fixture
    """SIGSTOP the portal for 8 s (the CPU-load incident, exaggerated): before the fix both
    nodes were declared offline and the deployment had no ready replica for a while."""
    portal = cluster["portal"]
    model = factories.make_model(cluster["operator"])
    factories.add_version(model, cluster["operator"], cluster["model_file"])
    api = api_client(portal, cluster["operator"])
    wait_until(lambda: Node.objects.filter(status=NodeStatus.READY).count() == 2, 60,
               "two nodes to join")
    created = api.post("/api/deployments/", json={
        "name": "mlp", "model": model.name, "version": 1, "replicas": 4,
        "memory_bytes": 64 * 1024**2})
    assert created.status_code == 201, created.text
    wait_until(lambda: len(ready_replicas("mlp")) == 4, 180, "four ready replicas")
    os.kill(portal.proc.pid, signal.SIGSTOP)
    try:
        seen = watch_for(8.0, lambda: (Node.objects.filter(status=NodeStatus.OFFLINE).count(),
                                       len(ready_replicas("mlp"))))
    finally:
        os.kill(portal.proc.pid, signal.SIGCONT)
    seen += watch_for(10.0, lambda: (Node.objects.filter(status=NodeStatus.OFFLINE).count(),
                                     len(ready_replicas("mlp"))))
    assert max(offline for offline, _ in seen) == 0
    assert min(ready for _, ready in seen) == 4
    assert not Replica.objects.filter(error="node missed its heartbeats").exists()
    # The control: the sweep was running all along, and still declares a node that died.
    cluster["agents"][1].kill()
    wait_until(lambda: Node.objects.filter(name="node-b", status=NodeStatus.OFFLINE).exists(),
               60, "the sweep to declare a killed node offline")


def watch_for(duration_s: float, sample: Any) -> list[Any]:
    """Return samples taken every 0.2 s for `duration_s` (observing, not waiting on)."""
    samples = []
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        samples.append(sample())
        time.sleep(0.2)
    return samples
