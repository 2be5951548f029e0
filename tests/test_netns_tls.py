"""Issue 12, test (a): a GPU server in a network namespace of its own joins over the link
in direct TLS mode and serves through the gateway; impostors at its address get nothing.

The portal and the gateway run on the host, listening on the host's end of the link that
tests/netns.py makes; `swarm-worker` runs inside the namespace (`ip netns exec`) with its
own address, so everything between them crosses a real network link. Root only (CI is).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from cryptography import x509
from knox.models import AuthToken

from registry.demo import build_mlp
from serving import node_ca, services
from serving.agent import credentials_tls
from serving.agent.credentials import node_state_dir
from serving.models import Node, Replica, ReplicaState
from tests import factories
from tests.certs import self_signed_files
from tests.conftest import free_port
from tests.e2e import LiveAgent
from tests.live import ROOT, LiveGateway, LivePortal, create_gateway_token
from tests.netns import NetnsHost, NetnsLab, require_netns
from tests.process_tree import cmdline
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
ROWS = [[0.5, -1.0, 2.0, 0.25]]
BODY = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": ROWS}]}
REFUSED = (502, 503)


def _infer(gateway: LiveGateway, api_key: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v2/models/mlp/infer", json=BODY, timeout=30,
                      headers={"Authorization": f"Bearer {api_key}"})


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _removed_nodes_certificate(directory: Path, join_secret: str, address: str
                               ) -> tuple[Path, Path]:
    """Return (cert, key) files of a node that joined for `address` and was removed: a
    certificate the portal's CA really signed, for the right address, but no longer listed."""
    identity = credentials_tls.new_identity("gone")
    from swarm_protocol.agent_messages import RegisterRequest
    reply = services.do_register_node(RegisterRequest(
        join_token=join_secret, name="gone", address=address, cost_per_hour=0.0, devices=[],
        csr_pem=identity.csr_pem))
    services.do_remove_node(Node.objects.get(pk=reply.node_id))
    return (_write_pem(directory / "gone.crt", reply.certificate_pem.encode()),
            _write_pem(directory / "gone.key", identity.key_pem))


class Impostor:
    """tests/impostor.py inside the namespace, on the port of the replica it replaces."""

    def __init__(self, host: NetnsHost, port: int, log_file: Path,
                 cert_key: tuple[Path, Path] | None = None) -> None:
        tls = ["--cert-file", str(cert_key[0]), "--key-file", str(cert_key[1])] if cert_key else []
        self.log_file = log_file
        log_file.touch()
        self.proc = host.popen([sys.executable, "-m", "tests.impostor", "--host", host.address,
                                "--port", str(port), "--log-file", str(log_file), *tls],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready and self.proc.stdout.readline().strip() == "LISTENING"

    def requests(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


def _replica_pid(host: NetnsHost, port: int) -> int:
    for pid in host.pids():
        words = cmdline(pid).split()
        if "serving.replica" in words and words[words.index("--port") + 1] == str(port):
            return pid
    raise AssertionError(f"no replica process on port {port} in {host.name}")


def _port_free(host: NetnsHost, port: int) -> bool:
    listening = host.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
    return not listening.strip()


def test_a_worker_in_its_own_namespace_serves_over_tls_and_impostors_get_nothing(
        tmp_path, artifact_root, operator, join_secret):
    require_netns()
    with NetnsLab() as lab:
        gpu = lab.add_host("gpu1")
        portal = LivePortal(free_port(), artifact_root, host=gpu.host_address,
                            HEARTBEAT_INTERVAL_S="1", ALLOWED_HOSTS=gpu.host_address).start()
        gateway = LiveGateway(portal.url, create_gateway_token(portal.env, "netns"),
                              host=gpu.host_address)
        # The test's portal is plain HTTP on the link (a lab network: the flag says so).
        agent = LiveAgent(portal.url, "gpu1", "9400-9409", tmp_path / "agent", join_secret,
                          "--allow-http-portal", address=gpu.address, prefix=gpu.command([]))
        try:
            gateway.start()
            agent.start()
            _serves_over_tls(tmp_path, portal, gateway, agent, gpu, operator, join_secret)
        finally:
            if agent.proc is not None and agent.proc.poll() is None:
                os.kill(agent.proc.pid, signal.SIGCONT)
            agent.kill()
            gateway.stop()
            portal.stop()


def _serves_over_tls(tmp_path: Path, portal: LivePortal, gateway: LiveGateway,
                     agent: LiveAgent, gpu: NetnsHost, operator, join_secret: str) -> None:
    node = wait_until(lambda: Node.objects.filter(name="gpu1").first(), 60,
                      "the worker to join over the link")
    assert node.address == gpu.address and node.cert_sha256
    files = credentials_tls.tls_files(node_state_dir(tmp_path / "agent", "gpu1"))
    wait_until(lambda: files.ca_path.exists(), 30, "the agent to store its certificate")
    for path in (files.key_path, files.cert_path, files.ca_path):
        assert path.stat().st_mode & 0o777 == 0o600
    shown = x509.load_pem_x509_certificate(files.cert_path.read_bytes())
    assert node_ca.key_pin(shown.public_key()) == node.cert_sha256

    model = factories.make_model(operator)
    factories.add_version(model, operator, factories.torchscript_file(tmp_path))
    _, token = AuthToken.objects.create(user=operator, expiry=None)
    created = httpx.post(f"{portal.url}/api/deployments/", timeout=30,
                         headers={"Authorization": f"Token {token}"},
                         json={"name": "mlp", "model": model.name, "version": 1, "replicas": 1,
                               "memory_bytes": 64 * 1024**2})
    assert created.status_code == 201, created.text
    replica = wait_until(lambda: Replica.objects.filter(
        deployment__name="mlp", state=ReplicaState.READY).first(), 120, "a ready replica")
    api_key = services.do_create_api_key(name="netns", user=operator, deployments=None,
                                         expires_in=None, rate_limit_rps=None)[1]

    answered = wait_until(lambda: (r := _infer(gateway, api_key)).status_code == 200 and r,
                          30, "inference through the gateway over TLS")
    with torch.inference_mode():
        expected = build_mlp()(torch.tensor(ROWS)).numpy()
    np.testing.assert_allclose(np.array(answered.json()["outputs"][0]["data"]).reshape(1, 3),
                               expected, rtol=1e-5, atol=1e-6)
    # The replica speaks TLS only: plain HTTP to it gets no answer at all.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{gpu.address}:{replica.port}/v2/health/ready", timeout=10)

    # Freeze the agent (it would restart its replica), free the port, put impostors there.
    os.kill(agent.proc.pid, signal.SIGSTOP)
    os.kill(_replica_pid(gpu, replica.port), signal.SIGKILL)
    wait_until(lambda: _port_free(gpu, replica.port), 30, "the replica's port to be free")
    impostors = {"plain HTTP": None,
                 "self-signed": self_signed_files(tmp_path / "self.crt", tmp_path / "self.key",
                                                  "swarm-node-1", [gpu.address]),
                 "a removed node's": _removed_nodes_certificate(tmp_path, join_secret,
                                                                gpu.address)}
    for kind, cert_key in impostors.items():
        impostor = Impostor(gpu, replica.port, tmp_path / f"{kind}.log", cert_key)
        try:
            refused = _infer(gateway, api_key)
            assert refused.status_code in REFUSED, (kind, refused.status_code, refused.text)
            assert impostor.requests() == [], f"the {kind} impostor got a request"
        finally:
            impostor.stop()

    # The node's own certificate is accepted... until the node is removed: then at once not.
    genuine = Impostor(gpu, replica.port, tmp_path / "genuine.log",
                       (files.cert_path, files.key_path))
    try:
        wait_until(lambda: _infer(gateway, api_key).status_code == 200, 30,
                   "the node's own certificate to be accepted (after any ejection)")
        assert genuine.requests()[-1]["authorization"] == f"Bearer {replica_key_of(node)}"
        services.do_remove_node(Node.objects.get(pk=node.pk))
        wait_until(lambda: _infer(gateway, api_key).status_code != 200, 30,
                   "the gateway to stop sending to the removed node")
        seen = len(genuine.requests())
        assert all(_infer(gateway, api_key).status_code != 200 for _ in range(5))
        assert len(genuine.requests()) == seen
    finally:
        genuine.stop()


def replica_key_of(node: Node) -> str:
    from serving.secrets import replica_key
    return replica_key(node.pk)
