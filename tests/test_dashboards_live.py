"""Live updates: sockets need a session, messages round-trip, and every route reaches a page."""

from __future__ import annotations

import os

import pytest
from asgiref.sync import sync_to_async

from dashboards import bus, relay
from dashboards.messages import (
    DEPLOYMENTS,
    FLEET,
    OVERVIEW,
    MessageError,
    NodeFiguresMessage,
    NodeStatusMessage,
    ReplicasChangedMessage,
    ScalingEventMessage,
    message_from_dict,
)
from dashboards.models import LiveEvent
from tests.dashboards_helpers import publish_from_another_process, session_cookie, socket

pytestmark = pytest.mark.django_db(transaction=True)

SAMPLES = [
    NodeFiguresMessage(node_id=3, at_s=1700000000.5,
                       devices=[{"index": 0, "utilization_pct": 42.0}],
                       replicas=[{"replica_id": 9, "completed": 10, "failed": 1}]),
    NodeStatusMessage(node_id=3, name="gpu-a", status="offline", at="2026-01-01T00:00:00+00:00"),
    ReplicasChangedMessage(deployment_id=5, deployment_name="mlp", desired_replicas=2,
                           replicas=[{"id": 9, "state": "ready"}],
                           at="2026-01-01T00:00:00+00:00"),
    ScalingEventMessage(deployment_id=5, deployment_name="mlp", at="2026-01-01T00:00:00+00:00",
                        from_replicas=1, to_replicas=3, reason="in-flight 40 > target 10"),
]


@pytest.fixture
def redis_layer(settings, redis_url):
    settings.CHANNEL_LAYERS = {"default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [redis_url], "prefix": f"test-dash-{os.getpid()}:asgi"}}}
    return redis_url


@pytest.fixture
def memory_layer(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


def test_every_message_type_round_trips_through_its_dict():
    for message in SAMPLES:
        assert message_from_dict(message.to_dict()) == message
    assert {m.type for m in SAMPLES} == {"node.figures", "node.status", "replicas.changed",
                                         "scaling.event"}
    with pytest.raises(MessageError, match="unknown live message type"):
        message_from_dict({"type": "nope"})
    with pytest.raises(MessageError, match="reason is required"):
        message_from_dict({k: v for k, v in SAMPLES[3].to_dict().items() if k != "reason"})


@pytest.mark.redis
async def test_an_anonymous_socket_is_refused(redis_layer):
    for path in ("/ws/overview/", "/ws/fleet/", "/ws/deployments/"):
        communicator = socket(path)
        connected, _ = await communicator.connect()
        assert not connected, path


@pytest.mark.redis
async def test_a_viewer_receives_every_message_type_through_redis(redis_layer, viewer):
    cookie = await sync_to_async(session_cookie)(viewer)
    pages = {group: socket(path, cookie) for group, path in
             ((OVERVIEW, "/ws/overview/"), (FLEET, "/ws/fleet/"),
              (DEPLOYMENTS, "/ws/deployments/"))}
    for communicator in pages.values():
        connected, _ = await communicator.connect()
        assert connected
    for message in SAMPLES:
        await sync_to_async(bus.publish)(message)
        for group, communicator in pages.items():
            if group in message.groups:
                assert await communicator.receive_json_from(timeout=1) == message.to_dict()
    for communicator in pages.values():
        assert await communicator.receive_nothing(timeout=0.2)
        await communicator.disconnect()


@pytest.mark.redis
async def test_a_malformed_payload_never_reaches_the_page(redis_layer, viewer):
    cookie = await sync_to_async(session_cookie)(viewer)
    communicator = socket("/ws/fleet/", cookie)
    assert (await communicator.connect(timeout=5))[0]
    await bus.send_to_groups([FLEET], {"type": bus.HANDLER, "payload": {"type": "bogus"}})
    await bus.send_to_groups([FLEET], bus.event_for(SAMPLES[1]))
    assert await communicator.receive_json_from(timeout=1) == SAMPLES[1].to_dict()
    await communicator.disconnect()


@pytest.mark.redis
@pytest.mark.slow
async def test_a_message_published_by_another_process_arrives_through_redis(redis_layer,
                                                                          viewer, settings):
    cookie = await sync_to_async(session_cookie)(viewer)
    communicator = socket("/ws/deployments/", cookie)
    assert (await communicator.connect(timeout=5))[0]
    prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]
    code = ("ScalingEventMessage(deployment_id=5, deployment_name='mlp', at='t', "
            "from_replicas=1, to_replicas=2, reason='burst')")
    # The other process has the real settings: Redis, with the test's group prefix.
    await sync_to_async(publish_from_another_process)(
        code, REDIS_URL=redis_layer, CACHE_KEY_PREFIX=prefix.removesuffix(":asgi"))
    # A deadline for a busy machine (the other process starts Django, then publishes).
    received = await communicator.receive_json_from(timeout=30)
    assert received["type"] == "scaling.event" and received["reason"] == "burst"
    assert await sync_to_async(LiveEvent.objects.count)() == 0  # Redis needs no outbox
    await communicator.disconnect()


@pytest.mark.slow
async def test_embedded_mode_relays_another_process_s_messages_through_the_outbox(
        memory_layer, viewer):
    cookie = await sync_to_async(session_cookie)(viewer)
    communicator = socket("/ws/overview/", cookie)
    assert (await communicator.connect(timeout=5))[0]
    code = ("ScalingEventMessage(deployment_id=7, deployment_name='mlp', at='t', "
            "from_replicas=2, to_replicas=0, reason='idle for 300 s')")
    # No REDIS_URL there: an in-memory layer that cannot reach us, so the row goes out.
    await sync_to_async(publish_from_another_process)(code, REDIS_URL="")
    received = await communicator.receive_json_from(timeout=2)
    assert received["reason"] == "idle for 300 s" and received["to_replicas"] == 0
    await communicator.disconnect()


def test_figures_never_go_to_the_outbox_but_other_messages_do(memory_layer):
    bus._state.update(hosts_consumers=False, loop=None)
    bus.publish(SAMPLES[0])
    assert LiveEvent.objects.count() == 0
    bus.publish(SAMPLES[3])
    assert sorted(LiveEvent.objects.values_list("group", flat=True)) == sorted(
        SAMPLES[3].groups)


def test_the_relay_prunes_old_rows(memory_layer):
    from datetime import timedelta

    from django.utils import timezone

    old = timezone.now() - timedelta(seconds=relay.KEEP_S + 5)
    LiveEvent.objects.create(group=FLEET, payload=SAMPLES[1].to_dict(), created=old)
    LiveEvent.objects.create(group=FLEET, payload=SAMPLES[1].to_dict(), created=timezone.now())
    assert relay.prune() == 1
    assert LiveEvent.objects.count() == 1


def test_a_failing_publish_does_not_fail_the_caller(settings, caplog):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]}}}
    bus._state.update(hosts_consumers=False, loop=None)
    bus.publish(SAMPLES[3])  # nobody listens on port 1
    assert "publishing scaling.event failed" in caplog.text


async def test_a_heartbeat_and_a_replica_state_change_reach_open_pages(memory_layer, viewer,
                                                                      gpu_node,
                                                                      served_deployment):
    from serving import services
    from serving.models import Replica
    from swarm_protocol.agent_messages import HeartbeatRequest, ReplicaStatus
    from tests.dashboards_helpers import gpu

    cookie = await sync_to_async(session_cookie)(viewer)
    fleet, deployments = socket("/ws/fleet/", cookie), socket("/ws/deployments/", cookie)
    for communicator in (fleet, deployments):
        assert (await communicator.connect(timeout=5))[0]
    replica = await sync_to_async(Replica.objects.get)()
    heartbeat = HeartbeatRequest(devices=[gpu(util=63.0)], replicas=[ReplicaStatus(
        replica_id=replica.pk, state="ready", port=9100, completed=5)])
    await sync_to_async(services.do_heartbeat)(gpu_node, heartbeat)
    figures = await fleet.receive_json_from(timeout=1)
    assert figures["type"] == "node.figures" and figures["node_id"] == gpu_node.pk
    assert figures["devices"][0]["utilization_pct"] == 63.0
    assert figures["replicas"][0]["completed"] == 5
    seen = [await deployments.receive_json_from(timeout=1) for _ in range(2)]
    changed = next(m for m in seen if m["type"] == "replicas.changed")
    assert changed["deployment_name"] == "mlp"
    assert [(r["id"], r["state"], r["node"]) for r in changed["replicas"]] == [
        (replica.pk, "ready", "gpu-a")]
    for communicator in (fleet, deployments):
        await communicator.disconnect()


async def test_an_auto_scaler_decision_reaches_open_pages_with_its_reason(
        memory_layer, viewer, gpu_node, served_deployment):
    from scaling import services as scaling
    from serving import services
    from serving.models import Replica
    from swarm_protocol.agent_messages import HeartbeatRequest, ReplicaStatus
    from tests.dashboards_helpers import gpu

    cookie = await sync_to_async(session_cookie)(viewer)
    overview, deployments = socket("/ws/overview/", cookie), socket("/ws/deployments/", cookie)
    for communicator in (overview, deployments):
        assert (await communicator.connect(timeout=5))[0]
    await sync_to_async(scaling.do_set_policy)(served_deployment, min_replicas=1,
                                               max_replicas=3, target_in_flight_per_replica=2.0)
    replica = await sync_to_async(Replica.objects.get)()
    await sync_to_async(services.do_heartbeat)(gpu_node, HeartbeatRequest(
        devices=[gpu()], replicas=[ReplicaStatus(replica_id=replica.pk, state="ready",
                                                 port=9100, mean_in_flight=6.0)]))
    events = await sync_to_async(scaling.tick)()
    assert [(e.from_replicas, e.to_replicas) for e in events] == [(1, 3)]

    async def scaling_event(communicator):
        for _ in range(10):
            message = await communicator.receive_json_from(timeout=2)
            if message["type"] == "scaling.event":
                return message
        raise AssertionError("no scaling.event among the first ten messages")

    for communicator in (overview, deployments):
        message = await scaling_event(communicator)
        assert (message["deployment_name"], message["from_replicas"],
                message["to_replicas"]) == ("mlp", 1, 3)
        assert message["reason"] == events[0].reason
        await communicator.disconnect()
