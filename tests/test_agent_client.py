"""The portal client and the stored node credentials."""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.agent import credentials as creds
from serving.agent.client import (
    CredentialsRevoked,
    PortalClient,
    PortalError,
    PortalUnreachable,
)
from swarm_protocol.agent_messages import HeartbeatRequest, RegisterRequest
from tests.agent_fakes import JOIN_TOKEN, FakePortal, desired_replica


@pytest.fixture
def portal() -> Iterator[FakePortal]:
    with FakePortal() as running:
        yield running


def register_request(token: str = JOIN_TOKEN) -> RegisterRequest:
    return RegisterRequest(join_token=token, name="box", address="10.0.0.5", cost_per_hour=1.5,
                           devices=[], labels={"zone": "a"})


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_register_then_heartbeat_with_the_node_secret(portal: FakePortal) -> None:
    portal.state.desired[1] = [desired_replica(5, b"ready")]
    client = PortalClient(portal.url, timeout_s=5.0)

    joined = client.register(register_request())
    client.node_secret = joined.node_secret
    reply = client.heartbeat(HeartbeatRequest(devices=[], replicas=[]))

    assert joined.node_id == 1 and joined.node_secret.startswith("swn_1_")
    assert portal.state.registrations[0]["labels"] == {"zone": "a"}
    assert [item.replica_id for item in reply.desired] == [5]
    assert reply.replica_key == joined.replica_key


def test_a_bad_join_token_is_refused_with_the_portal_message(portal: FakePortal) -> None:
    client = PortalClient(portal.url, timeout_s=5.0)

    with pytest.raises(PortalError, match="HTTP 401: invalid join token"):
        client.register(register_request(token="wrong"))


def test_a_revoked_secret_raises_credentials_revoked(portal: FakePortal) -> None:
    client = PortalClient(portal.url, timeout_s=5.0, node_secret="swn_9_gone")

    with pytest.raises(CredentialsRevoked, match="bad node secret"):
        client.heartbeat(HeartbeatRequest(devices=[], replicas=[]))


def test_a_failing_or_absent_portal_is_unreachable_not_fatal(portal: FakePortal) -> None:
    portal.state.unavailable = True
    with pytest.raises(PortalUnreachable, match="503"):
        PortalClient(portal.url, timeout_s=5.0).register(register_request())
    with pytest.raises(PortalUnreachable, match="ConnectError"):
        PortalClient(f"http://127.0.0.1:{unused_port()}", timeout_s=2.0).register(
            register_request())


def test_credentials_are_stored_readable_by_the_owner_only_and_reloaded(tmp_path: Path) -> None:
    state_dir = creds.node_state_dir(tmp_path, "gpu box/1")
    stored = creds.NodeCredentials(portal_url="https://portal.example", node_id=4,
                                   node_secret="swn_4_abc", replica_key="rk")

    path = creds.save_credentials(state_dir, stored)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.parent.name == "gpu_box_1"
    assert creds.load_credentials(state_dir, "https://portal.example/") == stored


def test_credentials_of_another_portal_or_unreadable_ones_are_ignored(tmp_path: Path) -> None:
    state_dir = creds.node_state_dir(tmp_path, "box")
    creds.save_credentials(state_dir, creds.NodeCredentials(
        portal_url="https://a.example", node_id=1, node_secret="swn_1_x", replica_key="k"))

    assert creds.load_credentials(state_dir, "https://b.example") is None
    (state_dir / creds.CREDENTIALS_FILE).write_text("{not json")
    assert creds.load_credentials(state_dir, "https://a.example") is None
