"""The node's TLS identity: a private key made here, and the certificate the portal signs.

At each join the agent makes a new EC P-256 key (it never leaves this machine), sends a
certificate signing request with the registration, and stores the key, the certificate and
the portal's CA certificate in its node directory, each 0600 like the credentials. Its
replicas serve TLS with them (`--tls-cert-file`, `--tls-key-file`); the agent checks its own
replicas' health over TLS too, trusting only the portal's CA.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarm_protocol.private_files import write_private

log = logging.getLogger(__name__)
KEY_FILE = "node.key"
CERT_FILE = "node.crt"
CA_FILE = "portal-ca.crt"


@dataclass(frozen=True)
class TlsFiles:
    """Where this node's key, certificate and the portal's CA certificate lie (PEM)."""

    key_path: Path
    cert_path: Path
    ca_path: Path


@dataclass(frozen=True)
class PendingIdentity:
    """A key made for a join, and the request that goes with it; stored once signed."""

    key_pem: bytes
    csr_pem: str


def new_identity(node_name: str) -> PendingIdentity:
    """Return a new private key and a CSR for it (the portal chooses the names it signs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return PendingIdentity(key_pem=key_pem, csr_pem=_csr(key, node_name))


def _csr(key: ec.EllipticCurvePrivateKey, node_name: str) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                       node_name[:64] or "node")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def save_identity(state_dir: Path, pending: PendingIdentity, certificate_pem: str,
                  ca_certificate_pem: str) -> TlsFiles:
    """Store the key with its signed certificate and the CA; return their paths.

    Raises ValueError when the certificate is not for this key or not signed by the CA.
    """
    _check_certificate(pending, certificate_pem, ca_certificate_pem)
    files = tls_files(state_dir)
    write_private(files.key_path, pending.key_pem)
    write_private(files.cert_path, certificate_pem.encode())
    write_private(files.ca_path, ca_certificate_pem.encode())
    return files


def _check_certificate(pending: PendingIdentity, certificate_pem: str,
                       ca_certificate_pem: str) -> None:
    certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    ca = x509.load_pem_x509_certificate(ca_certificate_pem.encode())
    key = serialization.load_pem_private_key(pending.key_pem, password=None)
    if certificate.public_key() != key.public_key():
        raise ValueError("the portal's certificate is not for this node's key")
    try:
        certificate.verify_directly_issued_by(ca)
    except (InvalidSignature, TypeError) as error:
        raise ValueError(f"the portal's certificate is not signed by its CA: "
                         f"{type(error).__name__}") from None


def renewal_csr(files: TlsFiles, now: datetime) -> str:
    """Return a CSR for the stored key once the certificate is in the last third of its
    life (the portal's renewal window), else ""."""
    certificate = x509.load_pem_x509_certificate(files.cert_path.read_bytes())
    life = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    if certificate.not_valid_after_utc - now > life / 3:
        return ""
    key = serialization.load_pem_private_key(files.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return _csr(key, "node")


def due_renewal_csr(files: TlsFiles | None) -> str:
    """Return renewal_csr(files, now), or "" without TLS or when the files are unreadable."""
    if files is None:
        return ""
    try:
        return renewal_csr(files, datetime.now(timezone.utc))  # noqa: UP017 - Python 3.10
    except (OSError, ValueError) as error:
        log.warning("cannot read this node's certificate for renewal: %s", error)
        return ""


def take_renewal(files: TlsFiles | None, certificate_pem: str) -> None:
    """Store a renewed certificate the portal sent; log (not raise) when it is unusable."""
    if files is None:
        return
    try:
        save_renewed_certificate(files, certificate_pem)
    except (OSError, ValueError) as error:
        log.error("the portal's renewed certificate is unusable: %s", error)
        return
    log.info("TLS certificate renewed (%s)", files.cert_path)


def save_renewed_certificate(files: TlsFiles, certificate_pem: str) -> None:
    """Replace the certificate with its renewal (same key, same CA); ValueError otherwise.

    Replicas pick the new file up by themselves (serving/replica/server.py)."""
    pending = PendingIdentity(key_pem=files.key_path.read_bytes(), csr_pem="")
    _check_certificate(pending, certificate_pem, files.ca_path.read_text())
    write_private(files.cert_path, certificate_pem.encode())


def tls_files(state_dir: Path) -> TlsFiles:
    """Return where the node's TLS files lie in `state_dir` (whether or not they exist)."""
    return TlsFiles(state_dir / KEY_FILE, state_dir / CERT_FILE, state_dir / CA_FILE)


def load_tls_files(state_dir: Path) -> TlsFiles | None:
    """Return the stored TLS files, or None when this node has none (plain HTTP)."""
    files = tls_files(state_dir)
    present = [p.is_file() for p in (files.key_path, files.cert_path, files.ca_path)]
    return files if all(present) else None


def forget_identity(state_dir: Path) -> None:
    """Delete the key and certificates (the portal revoked this node)."""
    files = tls_files(state_dir)
    for path in (files.key_path, files.cert_path, files.ca_path):
        path.unlink(missing_ok=True)


def replica_client_context(files: TlsFiles) -> ssl.SSLContext:
    """Return the context the agent reaches its own replicas with: the portal's CA only.

    No host name check: the agent connects over loopback to a certificate named for the
    node's advertised address; the CA alone says it is this node's.
    """
    context = ssl.create_default_context(cafile=str(files.ca_path))
    context.check_hostname = False
    return context
