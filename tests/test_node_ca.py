"""The node certificate authority: joins with a CSR get a pinned certificate for their
address; plain-HTTP joins only on loopback; the CA key stays encrypted in the database."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from serving import node_ca, services
from serving.agent import credentials_tls
from serving.gateway import node_tls
from serving.gateway.upstream import ConnectFailed, UpstreamPool
from serving.models import JoinToken, Node, NodeAuthority
from swarm_portal.errors import ServiceError
from swarm_protocol.agent_messages import RegisterRequest
from tests.conftest import free_port
from tests.live import ROOT

pytestmark = pytest.mark.django_db(transaction=True)


def join(secret: str, address: str, csr_pem: str = "") -> object:
    return services.do_register_node(RegisterRequest(
        join_token=secret, name="gpu-a", address=address, cost_per_hour=1.0, devices=[],
        csr_pem=csr_pem))


@pytest.fixture
def join_secret_twice(operator) -> str:
    _token, secret = services.do_create_join_token(name="lab", user=operator,
                                                   expires_in=None, uses=2)
    return secret


def test_a_join_with_a_csr_gets_a_certificate_for_its_address_and_id(join_secret, tmp_path):
    identity = credentials_tls.new_identity("gpu-a")
    reply = join(join_secret, "10.231.7.2", identity.csr_pem)

    certificate = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
    ca = x509.load_pem_x509_certificate(reply.ca_certificate_pem.encode())
    certificate.verify_directly_issued_by(ca)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.231.7.2")]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"urn:swarm:node:{reply.node_id}"]
    node = Node.objects.get(pk=reply.node_id)
    assert node.cert_sha256 == node_ca.key_pin(certificate.public_key())
    assert node.cert_serial == f"{certificate.serial_number:x}"
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc <= (
        node_ca.NODE_CERT_LIFETIME + node_ca.CLOCK_SKEW)
    # The agent stores the key with it, 0600; the key never went to the portal.
    files = credentials_tls.save_identity(tmp_path, identity, reply.certificate_pem,
                                          reply.ca_certificate_pem)
    for path in (files.key_path, files.cert_path, files.ca_path):
        assert path.stat().st_mode & 0o777 == 0o600
    authority = NodeAuthority.objects.get()
    assert b"PRIVATE KEY" not in authority.encrypted_key.encode()
    assert identity.key_pem.decode() not in str(list(Node.objects.values()))


def test_a_dns_name_is_a_dns_san(join_secret):
    reply = join(join_secret, "gpu-a.example.net", credentials_tls.new_identity("a").csr_pem)
    certificate = x509.load_pem_x509_certificate(reply.certificate_pem.encode())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gpu-a.example.net"]


def test_every_node_is_signed_by_one_ca(join_secret_twice):
    first = join(join_secret_twice, "10.0.0.1", credentials_tls.new_identity("a").csr_pem)
    second = join(join_secret_twice, "10.0.0.2", credentials_tls.new_identity("b").csr_pem)
    assert first.ca_certificate_pem == second.ca_certificate_pem
    assert NodeAuthority.objects.count() == 1


def test_a_network_address_without_a_csr_is_refused_and_uses_no_join(operator):
    _token, secret = services.do_create_join_token(name="once", user=operator,
                                                   expires_in=None, uses=1)
    with pytest.raises(ServiceError, match="must serve TLS") as refused:
        join(secret, "10.231.7.2")
    assert refused.value.status_code == 400
    assert not Node.objects.exists()
    assert JoinToken.objects.get().uses_left == 1
    assert join(secret, "10.231.7.2", credentials_tls.new_identity("a").csr_pem).node_id


@pytest.mark.parametrize("address", ["127.0.0.1", "127.3.0.1", "::1", "localhost"])
def test_loopback_nodes_may_serve_plain_http(join_secret_twice, address):
    reply = join(join_secret_twice, address)
    assert reply.certificate_pem == "" and reply.ca_certificate_pem == ""
    assert Node.objects.get(pk=reply.node_id).cert_sha256 == ""


@pytest.mark.parametrize("csr_pem, fragment", [
    ("not a csr", "not a valid certificate signing request"),
    ("x" * 9000, "at most"),
])
def test_bad_csrs_are_refused_with_the_reason(join_secret, csr_pem, fragment):
    with pytest.raises(ServiceError, match=fragment):
        join(join_secret, "10.0.0.1", csr_pem)
    assert not Node.objects.exists()


def test_a_weak_key_is_refused(join_secret):
    from cryptography import x509 as x
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP521R1())
    csr = (x.CertificateSigningRequestBuilder().subject_name(
        x.Name([x.NameAttribute(NameOID.COMMON_NAME, "n")])).sign(key, hashes.SHA256()))
    with pytest.raises(ServiceError, match="P-256 or P-384"):
        join(join_secret, "10.0.0.1", csr.public_bytes(serialization.Encoding.PEM).decode())


def test_a_changed_secret_key_says_what_to_do(join_secret_twice, settings):
    join(join_secret_twice, "10.0.0.1", credentials_tls.new_identity("a").csr_pem)
    settings.SECRET_KEY = "another-secret-key-" + "x" * 40
    with pytest.raises(node_ca.AuthorityUnreadable, match="SECRET_KEY changed"):
        join(join_secret_twice, "10.0.0.2", credentials_tls.new_identity("b").csr_pem)


# --- the gateway's side: TLS to the portal's CA, pinned (no namespaces needed) -----------


def _served(directory: Path, name: str, cert_pem: bytes, key_pem: bytes
            ) -> tuple[subprocess.Popen[str], int, Path]:
    """Start tests/impostor.py with this certificate on 127.0.0.1; return it, port, log."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    port, log = free_port(), directory / f"{name}.log"
    log.touch()
    proc = subprocess.Popen([sys.executable, "-m", "tests.impostor", "--host", "127.0.0.1",
                             "--port", str(port), "--log-file", str(log), "--cert-file",
                             str(cert), "--key-file", str(key)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "LISTENING"
    return proc, port, log


def _issued(secret: str, address: str) -> tuple[object, credentials_tls.PendingIdentity]:
    identity = credentials_tls.new_identity("n")
    return join(secret, address, identity.csr_pem), identity


async def _get(pool: UpstreamPool, port: int, tls: node_tls.UpstreamTls | None) -> int:
    response = await pool.request("127.0.0.1", port, b"GET", b"/v2/health/ready",
                                  [(b"authorization", b"Bearer replica-key")], tls=tls)
    return response.status


def test_the_gateway_accepts_only_the_pinned_certificate_of_the_ca(tmp_path, operator):
    _token, secret = services.do_create_join_token(name="lab", user=operator,
                                                   expires_in=None, uses=None)
    genuine, genuine_identity = _issued(secret, "127.0.0.1")
    other, other_identity = _issued(secret, "127.0.0.1")  # same CA, same address, not pinned
    wrong_name, wrong_name_identity = _issued(secret, "10.9.9.9")
    served = [
        _served(tmp_path, "genuine", genuine.certificate_pem.encode(), genuine_identity.key_pem),
        _served(tmp_path, "other", other.certificate_pem.encode(), other_identity.key_pem),
        _served(tmp_path, "wrong-name", wrong_name.certificate_pem.encode(),
                wrong_name_identity.key_pem)]
    pin = x509.load_pem_x509_certificate(genuine.certificate_pem.encode())
    tls = node_tls.upstream_tls(genuine.ca_certificate_pem, node_ca.key_pin(pin.public_key()),
                                "127.0.0.1")
    wrong_name_pin = node_ca.key_pin(x509.load_pem_x509_certificate(
        wrong_name.certificate_pem.encode()).public_key())

    async def scenario() -> None:
        pool = UpstreamPool()
        try:
            assert await _get(pool, served[0][1], tls) == 200
            with pytest.raises(ConnectFailed, match="not the one its node holds"):
                await _get(pool, served[1][1], tls)
            # The right certificate, pinned, but for another address: the name check fails.
            with pytest.raises(ConnectFailed):
                await _get(pool, served[2][1], node_tls.upstream_tls(
                    genuine.ca_certificate_pem, wrong_name_pin, "127.0.0.1"))
            # Without the portal's CA nothing is trusted, pin or no pin (a fresh pool: no
            # connection made before under this pin).
            with pytest.raises(ConnectFailed):
                await _get(UpstreamPool(), served[0][1], node_tls.upstream_tls(
                    "", tls.sha256, "127.0.0.1"))
            # An idle connection made under another pin is not reused for this one.
            assert pool.idle_count("127.0.0.1", served[0][1]) == 1
            stale_pin = node_tls.upstream_tls(genuine.ca_certificate_pem, "0" * 64,
                                              "127.0.0.1")
            with pytest.raises(ConnectFailed):
                await _get(pool, served[0][1], stale_pin)
        finally:
            pool.close()

    try:
        asyncio.run(scenario())
        requests = [len(log.read_text().splitlines()) for _proc, _port, log in served]
        assert requests == [1, 0, 0]  # only the pinned replica ever saw the key
    finally:
        for proc, _port, _log in served:
            proc.kill()
            proc.wait(timeout=30)


# --- renewal: the same key, in a heartbeat, in the last third of the certificate's life ---


def _heartbeat(node_id: int, csr_pem: str, now) -> str:
    from swarm_protocol.agent_messages import HeartbeatRequest
    reply = services.do_heartbeat(Node.objects.get(pk=node_id),
                                  HeartbeatRequest(devices=[], replicas=[], csr_pem=csr_pem),
                                  now=now)
    return reply.certificate_pem


def _csr_for(key_pem: bytes) -> str:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    key = serialization.load_pem_private_key(key_pem, None)
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "n")])).sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM).decode()


def test_a_node_renews_its_certificate_for_the_same_key_near_its_expiry(join_secret):
    from django.utils import timezone
    identity = credentials_tls.new_identity("gpu-a")
    joined = join(join_secret, "10.0.0.1", identity.csr_pem)
    node = Node.objects.get(pk=joined.node_id)
    first = x509.load_pem_x509_certificate(joined.certificate_pem.encode())
    csr = _csr_for(identity.key_pem)

    assert _heartbeat(node.pk, csr, timezone.now()) == ""  # too early: nothing signed
    late = node.cert_expires_at - node_ca.NODE_CERT_LIFETIME / 4
    renewed_pem = _heartbeat(node.pk, csr, late)
    renewed = x509.load_pem_x509_certificate(renewed_pem.encode())
    assert renewed.serial_number != first.serial_number
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    assert node_ca.key_pin(renewed.public_key()) == node.cert_sha256  # the pin holds
    after = Node.objects.get(pk=node.pk)
    assert after.cert_sha256 == node.cert_sha256
    assert after.cert_serial == f"{renewed.serial_number:x}"

    other = credentials_tls.new_identity("thief")
    with pytest.raises(ServiceError, match="must keep this node's key"):
        _heartbeat(node.pk, other.csr_pem, after.cert_expires_at - node_ca.NODE_CERT_LIFETIME / 4)
