"""The worker's side of direct TLS: when it is on, what it refuses, what it stores."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from serving import node_ca
from serving.agent import cli, credentials_tls
from serving.agent import credentials as creds
from serving.agent.agent import Agent
from serving.replica.config import ConfigError, load_config
from tests.agent_fakes import FakeNodeCa, FakePortal
from tests.certs import certificate, new_key, pem
from tests.live import ROOT
from tests.replica_models import (
    AUTH,
    KEY,
    MLP_SIGNATURE,
    build_tabular_mlp,
    free_port,
    replica_command,
    save_torchscript,
)
from tests.test_agent_loop import Running, heartbeat_count, make_agent
from tests.waiting import wait_until


@pytest.mark.parametrize("choice, address, expected", [
    ("auto", "10.0.0.5", True), ("auto", "gpu-1.lan", True), ("auto", "127.0.0.1", False),
    ("auto", "localhost", False), ("auto", "::1", False), ("on", "127.0.0.1", True),
    ("off", "127.0.0.1", False), ("off", "localhost", False)])
def test_tls_is_on_for_every_address_but_loopback_ones(choice, address, expected):
    assert cli.tls_enabled(choice, address) is expected


def test_plain_http_on_a_network_address_is_refused_before_anything_starts(tmp_path, capsys):
    code = cli.run(["--portal", "http://127.0.0.1:9", "--address", "10.0.0.5", "--tls", "off",
                    "--cache-dir", str(tmp_path)])
    assert code == cli.EXIT_USAGE
    assert "loopback addresses only" in capsys.readouterr().err
    assert not (tmp_path / "nodes").exists()


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    return key, certificate(key.public_key(), key, "ca", serial=1, ca=True, path_length=0)


def _signed(ca_key, ca, public_key) -> str:
    return pem(certificate(public_key, ca_key, "n", issuer=ca.subject, serial=2))


def test_the_agent_stores_only_a_certificate_for_its_own_key_from_its_ca(tmp_path):
    identity = credentials_tls.new_identity("gpu-1")
    assert b"PRIVATE KEY" in identity.key_pem and "CERTIFICATE REQUEST" in identity.csr_pem
    ca_key, ca = _ca()
    other_key = new_key()
    with pytest.raises(ValueError, match="not for this node's key"):
        credentials_tls.save_identity(tmp_path, identity,
                                      _signed(ca_key, ca, other_key.public_key()), pem(ca))
    own_public = serialization.load_pem_private_key(identity.key_pem, None).public_key()
    _, stranger = _ca()
    with pytest.raises(ValueError):
        credentials_tls.save_identity(tmp_path, identity, _signed(ca_key, ca, own_public),
                                      pem(stranger))
    assert credentials_tls.load_tls_files(tmp_path) is None  # nothing stored on refusal

    files = credentials_tls.save_identity(tmp_path, identity,
                                          _signed(ca_key, ca, own_public), pem(ca))
    assert credentials_tls.load_tls_files(tmp_path) == files
    assert all(p.stat().st_mode & 0o777 == 0o600
               for p in (files.key_path, files.cert_path, files.ca_path))
    credentials_tls.forget_identity(tmp_path)
    assert credentials_tls.load_tls_files(tmp_path) is None


def test_the_replica_wants_both_tls_files_or_neither(tmp_path):
    signature = tmp_path / "signature.json"
    signature.write_text('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], '
                         '"outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}')
    artifact = tmp_path / "model.pt"
    artifact.write_bytes(b"x")
    base = ["--artifact", str(artifact), "--format", "torchscript", "--model-name", "m",
            "--model-version", "1", "--signature-file", str(signature)]
    env = {"SWARM_REPLICA_KEY": "k" * 32}
    with pytest.raises(ConfigError, match="go together"):
        load_config([*base, "--tls-cert-file", str(artifact)], env)
    with pytest.raises(ConfigError, match="not a file"):
        load_config([*base, "--tls-cert-file", str(artifact), "--tls-key-file",
                     str(tmp_path / "missing")], env)
    config = load_config([*base, "--tls-cert-file", str(artifact), "--tls-key-file",
                          str(artifact)], env)
    assert (config.tls_cert_file, config.tls_key_file) == (str(artifact), str(artifact))
    assert load_config(base, env).tls_cert_file is None


def _signed_for(ca_key, ca, public_key, serial: int, not_before, not_after) -> str:
    return pem(certificate(public_key, ca_key, "n", issuer=ca.subject, serial=serial,
                           not_before=not_before, not_after=not_after, sans=["127.0.0.1"]))


def _saved_identity(tmp_path):
    """Save a new identity with a 30-day certificate (serial 2) a day into its life; return
    (CA key, CA, the identity, its public key, its TLS files, now)."""
    ca_key, ca = _ca()
    identity = credentials_tls.new_identity("gpu-1")
    own = serialization.load_pem_private_key(identity.key_pem, None).public_key()
    now = datetime.now(UTC)
    files = credentials_tls.save_identity(
        tmp_path, identity, _signed_for(ca_key, ca, own, 2, now - timedelta(days=1),
                                        now + timedelta(days=29)), pem(ca))
    return ca_key, ca, identity, own, files, now


def test_the_agent_asks_for_a_renewal_in_the_last_third_and_keeps_its_key(tmp_path):
    ca_key, ca, identity, own, files, now = _saved_identity(tmp_path)
    assert credentials_tls.renewal_csr(files, now) == ""
    csr = x509.load_pem_x509_csr(credentials_tls.renewal_csr(files, now + timedelta(days=21))
                                 .encode())
    assert csr.public_key() == own  # the same key: the gateways' pin holds

    renewed = _signed_for(ca_key, ca, own, 3, now, now + timedelta(days=30))
    # another key: logged and ignored
    credentials_tls.take_renewal(files, _signed(ca_key, ca, new_key().public_key()))
    assert x509.load_pem_x509_certificate(files.cert_path.read_bytes()).serial_number == 2
    credentials_tls.take_renewal(files, renewed)
    assert x509.load_pem_x509_certificate(files.cert_path.read_bytes()).serial_number == 3
    assert files.cert_path.stat().st_mode & 0o777 == 0o600
    assert files.key_path.read_bytes() == identity.key_pem


def _served_serial(port: int) -> int | None:
    try:
        pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=2)
    except OSError:
        return None
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


@pytest.mark.slow
def test_a_replica_serves_its_renewed_certificate_without_a_restart(tmp_path):
    ca_key, ca, _identity, own, files, now = _saved_identity(tmp_path)
    artifact = save_torchscript(build_tabular_mlp(seed=0), tmp_path / "mlp.pt")
    signature = tmp_path / "signature.json"
    signature.write_text(json.dumps(MLP_SIGNATURE))
    port = free_port()
    command = [*replica_command(artifact, "torchscript", signature, port),
               "--tls-cert-file", str(files.cert_path), "--tls-key-file", str(files.key_path)]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "SWARM_REPLICA_KEY": KEY},
                               stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _served_serial(port) == 2, 60, "the replica's TLS port")
        context = credentials_tls.replica_client_context(files)
        with httpx.Client(verify=context, headers=AUTH, timeout=10) as client:
            ready = wait_until(lambda: client.get(
                f"https://127.0.0.1:{port}/v2/health/ready").status_code == 200, 60, "ready")
            assert ready
        credentials_tls.take_renewal(files, _signed_for(ca_key, ca, own, 3, now,
                                                        now + timedelta(days=30)))
        wait_until(lambda: _served_serial(port) == 3, 60,
                   "the renewed certificate from the next handshake on", interval_s=0.5)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)


def _pin_of_csr(csr_pem: str) -> str:
    return node_ca.key_pin(x509.load_pem_x509_csr(csr_pem.encode()).public_key())


def _pin_of_certificate(path: Path) -> str:
    return node_ca.key_pin(x509.load_pem_x509_certificate(path.read_bytes()).public_key())


def test_a_removed_node_drops_its_key_and_joins_again_with_a_new_key_and_certificate(
        tmp_path: Path) -> None:
    with FakePortal() as portal:
        portal.state.node_ca = FakeNodeCa()
        agent = make_agent(portal, tmp_path, tls=True)
        running = Running(agent)
        try:
            _rejoins_with_a_new_identity(portal, agent)
        finally:
            running.stop()


def _rejoins_with_a_new_identity(portal: FakePortal, agent: Agent) -> None:
    wait_until(lambda: heartbeat_count(portal, 1), what="node 1's first heartbeat")
    files = credentials_tls.tls_files(agent.state_dir)
    first_key = files.key_path.read_bytes()
    first_pin = _pin_of_certificate(files.cert_path)
    assert first_pin == _pin_of_csr(portal.state.registrations[0]["csr_pem"])
    identity = (files.key_path, files.cert_path, files.ca_path,
                agent.state_dir / creds.CREDENTIALS_FILE)
    kept_at_rejoin: list[list[str]] = []  # what is still on disk when it asks to join again
    portal.on_register = lambda _body: kept_at_rejoin.append(
        [path.name for path in identity if path.exists()])

    portal.revoke(1)  # what the portal answers a removed node: 401 to its secret

    wait_until(lambda: heartbeat_count(portal, 2), what="node 2's first heartbeat")
    assert kept_at_rejoin == [[]]  # key, certificates and secret gone before rejoining
    assert agent.tls_files == credentials_tls.load_tls_files(agent.state_dir) == files
    second_key = files.key_path.read_bytes()
    second_pin = _pin_of_certificate(files.cert_path)
    assert second_key != first_key
    assert second_pin != first_pin  # a gateway pinning the removed node refuses the new one
    assert second_pin == _pin_of_csr(portal.state.registrations[1]["csr_pem"])
    assert files.ca_path.read_text() == portal.state.node_ca.certificate_pem
    leftovers = [path for path in agent.state_dir.rglob("*")
                 if path.is_file() and first_key in path.read_bytes()]
    assert leftovers == []  # the old private key is kept nowhere
