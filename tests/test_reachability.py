"""Reachability at join and the portal's side of the tunnel (serving/services/reachability.py).

The probe is real: the agent's ReachabilityProbe listens on loopback and the portal connects
to it over TCP; "unreachable" is a port nobody listens on. Views run on Django's test client.
"""

from __future__ import annotations

import hashlib
import socket
import threading

import pytest
from django.test import Client

from serving.agent.tunnel import ReachabilityProbe
from serving.gateway.routes import RouteTable
from serving.gateway_api import issue_gateway_token
from serving.models import Node
from serving.services import reachability
from swarm_protocol.agent_messages import RegisterRequest
from tests.cache_tools import clear_own_cache
from tests.replica_models import free_port

pytestmark = pytest.mark.django_db
REGISTER = "/api/agent/register"
HEARTBEAT = "/api/agent/heartbeat"
TABLE = "/api/gateway/table"


@pytest.fixture(autouse=True)
def empty_cache():
    clear_own_cache()


def _join(client: Client, join_secret: str, **fields: object) -> dict:
    body = RegisterRequest(join_token=join_secret, name="n1", address="127.0.0.1",
                           cost_per_hour=0.0, devices=[]).to_dict()
    response = client.post(REGISTER, {**body, **fields}, content_type="application/json")
    assert response.status_code == 201, response.content
    return response.json()


def _heartbeat(client: Client, secret: str) -> dict:
    response = client.post(HEARTBEAT, {"devices": [], "replicas": []},
                           content_type="application/json",
                           headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200, response.content
    return response.json()


def test_a_node_that_answers_the_probe_with_its_nonce_is_direct(join_secret):
    first = free_port()
    ports = range(first, first + 1)  # one port: two free_port() calls need not ascend
    with ReachabilityProbe("127.0.0.1", ports) as probe:
        assert probe.port is not None
        joined = _join(Client(), join_secret, probe_port=probe.port,
                       probe_nonce=probe.nonce)
    assert joined["reach_mode"] == "direct"
    assert Node.objects.get(pk=joined["node_id"]).reach_mode == "direct"


def test_a_node_the_portal_cannot_connect_to_serves_through_a_tunnel(join_secret):
    joined = _join(Client(), join_secret, probe_port=free_port(), probe_nonce="abc")
    assert joined["reach_mode"] == "tunnel"
    assert Node.objects.get(pk=joined["node_id"]).reach_mode == "tunnel"


def test_a_service_that_answers_anything_but_the_nonce_is_not_reachable(join_secret):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_wrongly() -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    thread = threading.Thread(target=answer_wrongly, daemon=True)
    thread.start()
    try:
        assert not reachability.probe("127.0.0.1", port, "the-nonce")
    finally:
        thread.join(timeout=10)
        server.close()


def test_tunnel_asked_for_is_granted_without_a_probe(join_secret):
    joined = _join(Client(), join_secret, tunnel=True)
    assert joined["reach_mode"] == "tunnel"


def test_an_older_agent_without_a_probe_stays_direct(join_secret):
    assert _join(Client(), join_secret)["reach_mode"] == "direct"


def test_a_bad_join_token_is_refused_before_any_probe(monkeypatch):
    probed = []
    monkeypatch.setattr(reachability, "probe", lambda *args: probed.append(args) or True)
    body = RegisterRequest(join_token="swj_nope", name="n1", address="127.0.0.1",
                           cost_per_hour=0.0, devices=[], probe_port=9000,
                           probe_nonce="abc").to_dict()
    response = Client().post(REGISTER, body, content_type="application/json")
    assert response.status_code == 401 and "join token" in response.json()["error"]
    assert probed == []


@pytest.mark.parametrize("port", [0, 22, 1023, 70000])
def test_privileged_or_impossible_probe_ports_are_not_probed(join_secret, monkeypatch, port):
    probed = []
    monkeypatch.setattr(reachability, "probe", lambda *args: probed.append(args) or True)
    response = Client().post(REGISTER, {**RegisterRequest(
        join_token=join_secret, name="n1", address="127.0.0.1", cost_per_hour=0.0,
        devices=[]).to_dict(), "probe_port": port, "probe_nonce": "abc"},
        content_type="application/json")
    assert response.status_code in (201, 400)
    assert probed == []


def test_a_tunnel_node_hears_its_key_and_the_gateways_tunnel_urls(join_secret):
    gateway_token = issue_gateway_token("edge-1")[1]
    gateway = Client(headers={"Authorization": f"Bearer {gateway_token}"})
    url = "ws://10.0.0.5:7443/tunnel"
    assert gateway.get(TABLE, {"instance": "gw-1", "tunnel": url}).status_code == 200
    joined = _join(Client(), join_secret, tunnel=True)
    reply = _heartbeat(Client(), joined["node_secret"])
    assert reply["reach_mode"] == "tunnel" and reply["tunnel_urls"] == [url]
    assert reply["tunnel_key"] == reachability.tunnel_key(joined["node_id"])
    # The table carries only the key's digest, never the key.
    table = gateway.get(TABLE, {"instance": "gw-1", "tunnel": url})
    raw = table.content.decode()
    assert reply["tunnel_key"] not in raw
    parsed = RouteTable.from_dict(table.json())
    assert parsed.tunnels == {joined["node_id"]: hashlib.sha256(
        reply["tunnel_key"].encode()).hexdigest()}


def test_a_direct_node_hears_nothing_of_tunnels(join_secret):
    joined = _join(Client(), join_secret)
    reply = _heartbeat(Client(), joined["node_secret"])
    assert reply["reach_mode"] == "direct" and reply["tunnel_key"] == ""
    assert reply["tunnel_urls"] == []


@pytest.mark.parametrize("url", ["http://10.0.0.5/tunnel", "ws://a b/", "ws://x/" + "a" * 300,
                                 "javascript:alert(1)", "ws://h/\x00"])
def test_a_gateway_s_bad_tunnel_url_is_a_400(url):
    gateway_token = issue_gateway_token("edge-1")[1]
    gateway = Client(headers={"Authorization": f"Bearer {gateway_token}"})
    response = gateway.get(TABLE, {"instance": "gw-1", "tunnel": url})
    assert response.status_code == 400 and "tunnel" in response.json()["error"]


def test_a_tunnel_node_takes_replicas_only_while_a_gateway_accepts_tunnels(join_secret):
    from collections import Counter

    from serving.services.reconcile import node_views

    direct = _join(Client(), join_secret, probe_port=None)["node_id"]
    tunnel = _join(Client(), join_secret, tunnel=True, name="n2")["node_id"]
    Node.objects.filter(pk__in=[direct, tunnel]).update(status="ready")
    # make run's gateways have no tunnel port: a replica placed there would never be called.
    assert {view.node_id for view in node_views(Counter())} == {direct}
    gateway = Client(headers={"Authorization": f"Bearer {issue_gateway_token('edge-1')[1]}"})
    # An instance of its own: the portal writes each instance's URL at most once a second
    # per process, and the test before may have just written gw-1's (then the cache cleared).
    assert gateway.get(TABLE, {"instance": "gw-placement",
                               "tunnel": "ws://10.0.0.9:7443/tunnel"}).status_code == 200
    assert {view.node_id for view in node_views(Counter())} == {direct, tunnel}
