"""Test certificates: EC P-256, SHA-256, valid from five minutes ago for a day by default.

`certificate` builds one (self-signed when `signer` is the subject's own key); `self_signed_files`
writes a self-signed one and its key (0600) as PEM files; `pem` is a certificate's PEM text.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def certificate(public_key: ec.EllipticCurvePublicKey, signer: ec.EllipticCurvePrivateKey,
                subject: str, *, issuer: x509.Name | None = None, serial: int | None = None,
                not_before: datetime | None = None, not_after: datetime | None = None,
                sans: Sequence[str] = (), ca: bool = False, path_length: int | None = None,
                server_auth: bool = False) -> x509.Certificate:
    """Return a certificate for `public_key` named `subject` (common name), signed by `signer`.

    `issuer`: the signer's name (default: the subject's, i.e. self-signed); `sans`: IP
    addresses or DNS names; `ca`: a critical BasicConstraints(ca=True, path_length);
    `server_auth`: an extended key usage for TLS servers. Serial random by default.
    """
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(public_key)
               .serial_number(x509.random_serial_number() if serial is None else serial)
               .not_valid_before(not_before or now - timedelta(minutes=5))
               .not_valid_after(not_after or now + timedelta(days=1)))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
    if server_auth:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def new_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def pem(cert: x509.Certificate) -> str:
    """Return `cert` as PEM text."""
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def self_signed_files(cert_path: Path, key_path: Path, subject: str, sans: Sequence[str],
                      ca: bool = False, server_auth: bool = False) -> tuple[Path, Path]:
    """Write a self-signed certificate for `sans` and its key (PKCS8, mode 0600) as PEM;
    return (cert_path, key_path)."""
    key = new_key()
    cert = certificate(key.public_key(), key, subject, sans=sans, ca=ca,
                       server_auth=server_auth)
    cert_path.write_text(pem(cert))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path
