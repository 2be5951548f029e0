"""Issue 12, tests (b) and (c): GPU servers the gateway cannot reach serve through tunnels.

Each worker runs in a network namespace of its own (tests/netns.py) with its replicas and its
reachability probe listening on the namespace's loopback only, so nothing on the host (the
portal, the gateway) can open a connection to them: the portal's probe at join finds the
advertised address unreachable, the node is told `tunnel`, and its agent opens a WebSocket to
the gateway's tunnel port over the link. (b) one such worker joins and serves; (c) under
steady load over two of them, one link is cut: no client request fails, and once the link is
back the node's replica answers requests again within the design's bound (BACK_WITHIN_S).
Root only (CI is); all torn down.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from knox.models import AuthToken

from registry.demo import build_mlp
from serving import services
from serving.agent.cli import tls_enabled
from serving.agent.tunnel import BACKOFF_MAX_S, OPEN_TIMEOUT_S
from serving.models import Node, Replica, ReplicaState
from serving.secrets import replica_key
from swarm_protocol.tunnel import PING_INTERVAL_S, PING_TIMEOUT_S
from tests import factories
from tests.conftest import free_port
from tests.e2e import LiveAgent
from tests.live import LiveGateway, LivePortal, create_gateway_token
from tests.netns import NetnsHost, NetnsLab, require_netns
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
ROWS = [[0.5, -1.0, 2.0, 0.25]]
BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": ROWS}]}
LOAD_THREADS = 4
HEARTBEAT_INTERVAL_S = 1.0  # the test portal's
# How soon a node whose link came back must serve again (issue 12: "within the heartbeat
# window"), from the design's figures: when the link returns the agent may still hold the
# old tunnel, which the gateway has dropped (the test waits for that), so the link is not
# silent: its pings give up within PING_INTERVAL_S + PING_TIMEOUT_S = 2 + 4 s (websockets'
# close_timeout adds 10 s only on a link that stays silent: test_tunnel_liveness); or it
# may be opening one into the cut link, given up after OPEN_TIMEOUT_S = 5 s; it then waits
# at most BACKOFF_MAX_S = 5 s (less once a heartbeat gets through: that nudges it), and the
# gateway routes to it the moment it connects. One heartbeat interval (1 s) on top, as the
# issue words it: the node's first heartbeat brings it back to `ready` if the portal declared
# it offline meanwhile (its ready replica stays routable then, so this is slack, not a step
# on the path). So 6 + 5 + 1 = 12 s; plus a margin of 8 s for a loaded 2-core CI machine
# (TLS handshakes on the new tunnel and to the replica, the probe of the replica's count
# started in the namespace): 20 s.
DESIGN_BACK_WITHIN_S = (max(PING_INTERVAL_S + PING_TIMEOUT_S, OPEN_TIMEOUT_S) + BACKOFF_MAX_S
                        + HEARTBEAT_INTERVAL_S)
BACK_WITHIN_S = DESIGN_BACK_WITHIN_S + 8.0
SERVED_AGAIN = 10  # requests the restored node's replica itself must answer
# Run inside a worker's namespace: the replica's own count of completed requests (its
# /stats; it listens on the namespace's loopback only). No certificate check: counting
# is the point here, test_netns_tls checks the certificates.
_COMPLETED_PROBE = """
import json, ssl, sys, urllib.request
scheme, port = sys.argv[1:]
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/stats",
                                 headers={"Authorization": "Bearer " + sys.stdin.read()})
print(json.load(urllib.request.urlopen(request, timeout=10, context=context))["completed"])
"""


class Pool:
    """The portal and a gateway with a tunnel port on the host, workers in namespaces."""

    def __init__(self, lab: NetnsLab, tmp_path: Path, artifact_root: Path, join_secret: str,
                 names: tuple[str, ...]) -> None:
        self.hosts = [lab.add_host(name) for name in names]
        # The portal and the gateway listen on the host's end of a link no test cuts (an
        # address on a link that is down is unreachable from every namespace).
        host_side = lab.add_host("edge", default_route=False).host_address
        self.portal = LivePortal(free_port(), artifact_root, host=host_side,
                                 HEARTBEAT_INTERVAL_S=str(HEARTBEAT_INTERVAL_S),
                                 ALLOWED_HOSTS=host_side)
        self.gateway = LiveGateway(self.portal.url, "", "--tunnel-port", "0", host=host_side)
        self.agents = [
            LiveAgent(self.portal.url, host.name.rsplit("-", 1)[1], "9400-9409",
                      tmp_path / f"agent-{index}", join_secret, "--bind-host", "127.0.0.1",
                      "--allow-http-portal", address=host.address, prefix=host.command([]))
            for index, host in enumerate(self.hosts)]

    def start(self) -> Pool:
        self.portal.start()
        self.gateway.env["SWARM_GATEWAY_TOKEN"] = create_gateway_token(self.portal.env,
                                                                       "netns-tunnel")
        self.gateway.start()
        for agent in self.agents:
            agent.start()
        return self

    def stop(self) -> None:
        for agent in self.agents:
            agent.kill()
        self.gateway.stop()
        self.portal.stop()

    def infer(self, api_key: str, client: httpx.Client | None = None) -> httpx.Response:
        post = client.post if client is not None else httpx.post
        return post(f"{self.gateway.url}/v2/models/mlp/infer", json=BODY, timeout=60,
                    headers={"Authorization": f"Bearer {api_key}"})

    def routed_replicas(self) -> set[int]:
        """Return the replica ids the gateway's balancer holds now (its /metrics)."""
        text = httpx.get(f"{self.gateway.url}/metrics", timeout=10).text
        return {int(found) for found in re.findall(
            r'swarm_gateway_replica_in_flight\{[^}]*replica="(\d+)"', text)}

    def completed_at(self, replica: Replica) -> int:
        """Return how many requests the replica itself has answered (its own /stats)."""
        host = next(h for h in self.hosts if h.address == replica.node.address)
        # The agents' addresses are not loopback ones: their replicas serve TLS.
        scheme = "https" if tls_enabled("auto", host.address) else "http"
        probe = host.run([sys.executable, "-c", _COMPLETED_PROBE, scheme, str(replica.port)],
                         input=replica_key(replica.node_id), timeout_s=30)
        return int(probe.stdout)


def _deploy(tmp_path: Path, portal: LivePortal, operator, replicas: int) -> str:
    """Deploy the demo MLP; return an API key for it."""
    model = factories.make_model(operator)
    factories.add_version(model, operator, factories.torchscript_file(tmp_path))
    _, token = AuthToken.objects.create(user=operator, expiry=None)
    created = httpx.post(f"{portal.url}/api/deployments/", timeout=30,
                         headers={"Authorization": f"Token {token}"},
                         json={"name": "mlp", "model": model.name, "version": 1,
                               "replicas": replicas, "memory_bytes": 64 * 1024**2})
    assert created.status_code == 201, created.text
    return services.do_create_api_key(name="netns", user=operator, deployments=None,
                                      expires_in=None, rate_limit_rps=None)[1]


def _ready_replicas(count: int) -> list[Replica]:
    ready = list(Replica.objects.filter(deployment__name="mlp", state=ReplicaState.READY)
                 .select_related("node"))
    return ready if len(ready) >= count else []


def _unreachable_from_host(host: NetnsHost, port: int) -> bool:
    try:
        httpx.get(f"http://{host.address}:{port}/v2/health/ready", timeout=5)
    except httpx.HTTPError:
        return True
    return False


def test_b_a_worker_without_an_inbound_route_joins_and_serves_through_the_tunnel(
        tmp_path, artifact_root, operator, join_secret):
    require_netns()
    with NetnsLab() as lab:
        pool = Pool(lab, tmp_path, artifact_root, join_secret, ("gpu1",))
        try:
            pool.start()
            node = wait_until(lambda: Node.objects.filter(name="gpu1").first(), 60,
                              "the worker to join over the link")
            assert node.address == pool.hosts[0].address
            assert node.reach_mode == "tunnel"  # the portal's probe found no way in
            api_key = _deploy(tmp_path, pool.portal, operator, replicas=1)
            replica = wait_until(lambda: _ready_replicas(1), 120, "a ready replica")[0]
            answered = wait_until(
                lambda: (r := pool.infer(api_key)).status_code == 200 and r, 60,
                "inference through the tunnel")
            with torch.inference_mode():
                expected = build_mlp()(torch.tensor(ROWS)).numpy()
            np.testing.assert_allclose(
                np.array(answered.json()["outputs"][0]["data"]).reshape(1, 3), expected,
                rtol=1e-5, atol=1e-6)
            # The replica listens inside its namespace only: the host cannot reach it.
            assert _unreachable_from_host(pool.hosts[0], replica.port)
            assert replica.id in pool.routed_replicas()
        finally:
            pool.stop()


def _load(pool: Pool, api_key: str, stop: threading.Event, outcomes: Counter[str]) -> None:
    with httpx.Client() as client:
        while not stop.is_set():
            try:
                outcomes[str(pool.infer(api_key, client).status_code)] += 1
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1


def test_c_cutting_a_tunnel_node_s_link_under_load_fails_no_request_and_it_comes_back(
        tmp_path, artifact_root, operator, join_secret):
    require_netns()
    with NetnsLab() as lab:
        pool = Pool(lab, tmp_path, artifact_root, join_secret, ("gpu1", "gpu2"))
        stop = threading.Event()
        outcomes: Counter[str] = Counter()
        threads: list[threading.Thread] = []
        try:
            pool.start()
            wait_until(lambda: Node.objects.filter(reach_mode="tunnel").count() == 2, 60,
                       "both workers joined in tunnel mode")
            api_key = _deploy(tmp_path, pool.portal, operator, replicas=2)
            replicas = wait_until(lambda: _ready_replicas(2), 120, "two ready replicas")
            assert {r.node.name for r in replicas} == {"gpu1", "gpu2"}
            cut = next(r for r in replicas if r.node.name == "gpu1")
            cut_replica = cut.id
            wait_until(lambda: pool.routed_replicas() >= {r.id for r in replicas}, 60,
                       "both tunnels up and both replicas routed")
            threads = [threading.Thread(target=_load, args=(pool, api_key, stop, outcomes))
                       for _ in range(LOAD_THREADS)]
            for thread in threads:
                thread.start()
            wait_until(lambda: sum(outcomes.values()) >= 20, 60, "steady load")
            pool.hosts[0].cut()
            wait_until(lambda: cut_replica not in pool.routed_replicas(), 60,
                       "the cut node's replica out of the gateway's table")
            served = sum(outcomes.values())
            wait_until(lambda: sum(outcomes.values()) >= served + 20, 60,
                       "load served by the other node alone")
            completed_before = pool.completed_at(cut)
            pool.hosts[0].restore()
            restored_s = time.monotonic()
            wait_until(lambda: cut_replica in pool.routed_replicas(), BACK_WITHIN_S,
                       "the node back in the gateway's table", interval_s=0.1)
            routed_after_s = time.monotonic() - restored_s
            # Routed is not serving: the node's replica itself must answer requests again.
            wait_until(lambda: pool.completed_at(cut) >= completed_before + SERVED_AGAIN,
                       BACK_WITHIN_S - routed_after_s,
                       f"the restored node's replica to answer {SERVED_AGAIN} requests",
                       interval_s=0.1)
            back_after_s = time.monotonic() - restored_s
            served = sum(outcomes.values())
            wait_until(lambda: sum(outcomes.values()) >= served + 20, 60, "load after")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=90)
            pool.stop()
        assert set(outcomes) == {"200"}, outcomes
        print(f"served {outcomes['200']} requests, none failed; after its link came back the "
              f"node was routed again in {routed_after_s:.1f} s and its replica had answered "
              f"{SERVED_AGAIN} requests in {back_after_s:.1f} s (bound {BACK_WITHIN_S:g} s, "
              f"design {DESIGN_BACK_WITHIN_S:g} s)")
