"""The worker's side of direct TLS: when it is on, what it refuses, what it stores."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from serving.agent import cli, credentials_tls
from serving.replica.config import ConfigError, load_config


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
    from datetime import UTC, datetime, timedelta
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(1)
                   .not_valid_before(now).not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(key, hashes.SHA256()))
    return key, certificate


def _signed(ca_key, ca, public_key) -> str:
    from datetime import UTC, datetime, timedelta
    now = datetime.now(UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n")]))
            .issuer_name(ca.subject).public_key(public_key).serial_number(2)
            .not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(ca_key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM).decode()


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def test_the_agent_stores_only_a_certificate_for_its_own_key_from_its_ca(tmp_path):
    identity = credentials_tls.new_identity("gpu-1")
    assert b"PRIVATE KEY" in identity.key_pem and "CERTIFICATE REQUEST" in identity.csr_pem
    ca_key, ca = _ca()
    other_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ValueError, match="not for this node's key"):
        credentials_tls.save_identity(tmp_path, identity,
                                      _signed(ca_key, ca, other_key.public_key()), _pem(ca))
    own_public = serialization.load_pem_private_key(identity.key_pem, None).public_key()
    _, stranger = _ca()
    with pytest.raises(ValueError):
        credentials_tls.save_identity(tmp_path, identity, _signed(ca_key, ca, own_public),
                                      _pem(stranger))
    assert credentials_tls.load_tls_files(tmp_path) is None  # nothing stored on refusal

    files = credentials_tls.save_identity(tmp_path, identity,
                                          _signed(ca_key, ca, own_public), _pem(ca))
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
