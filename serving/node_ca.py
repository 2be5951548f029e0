"""The portal's certificate authority for nodes: replicas serve TLS with what it signs.

One CA per portal (the NodeAuthority row, made on first use): an EC P-256 key and a
self-signed certificate valid for 20 years. Its private key never leaves the portal: it is
stored Fernet-encrypted under a key derived from SECRET_KEY, so every portal instance shares
it through the database while a database dump alone cannot sign anything.

A node sends a certificate signing request when it joins; the portal ignores what the request
asks for except its public key, and signs a certificate valid NODE_CERT_LIFETIME for:
subject CN "swarm-node-<id>", SANs the node's advertised address (an IP address or a DNS name)
and the URI `urn:swarm:node:<id>`. Gateways trust only this CA and pin each replica to its
node's current key (Node.cert_sha256: the sha256 of the certificate's public key), so a
removed node's certificate, or one its node replaced with a new key, stops being accepted
with the next routing table; a renewal for the same key keeps the pin.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.conf import settings
from django.db import IntegrityError, transaction

from serving.models import NodeAuthority
from swarm_portal.errors import ServiceError

log = logging.getLogger(__name__)
CA_LIFETIME = timedelta(days=20 * 365)
NODE_CERT_LIFETIME = timedelta(days=30)
CLOCK_SKEW = timedelta(minutes=5)  # not-before this far back: a node's clock may be behind
MAX_CSR_CHARS = 8192
_AUTHORITY_PK = 1
_MIN_RSA_BITS = 2048
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)


class CertificateRequestError(ServiceError):
    """A certificate signing request the portal will not sign (400, the reason says why)."""


class AuthorityUnreadable(RuntimeError):
    """The CA key cannot be decrypted: SECRET_KEY changed since the CA was made."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A node certificate: what the node gets and what the portal keeps of it."""

    certificate_pem: str
    sha256: str  # key_pin: the sha256 of its public key (SPKI), hex: what gateways pin
    serial_hex: str
    not_after: datetime


def fingerprint(certificate: x509.Certificate) -> str:
    """Return the sha256 hex digest of a certificate's DER encoding."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def key_pin(public_key: CertificatePublicKeyTypes) -> str:
    """Return what gateways pin: the sha256 hex digest of the key's SubjectPublicKeyInfo.

    The key, not the certificate: a renewed certificate for the same key keeps the pin, so
    replicas still serving the previous one stay valid until it expires.
    """
    return hashlib.sha256(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def _fernet() -> Fernet:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"swarm-portal node CA key").derive(settings.SECRET_KEY.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def _new_authority(now: datetime) -> NodeAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Swarm Portal node CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Swarm Portal")])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return NodeAuthority(
        pk=_AUTHORITY_PK,
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        encrypted_key=_fernet().encrypt(key_pem).decode())


def authority(now: datetime) -> NodeAuthority:
    """Return the CA row, making it on first use (two portals racing make one)."""
    found = NodeAuthority.objects.filter(pk=_AUTHORITY_PK).first()
    if found is not None:
        return found
    made = _new_authority(now)
    try:
        with transaction.atomic():
            made.save(force_insert=True)
    except IntegrityError:  # another portal instance made it first: use theirs
        return NodeAuthority.objects.get(pk=_AUTHORITY_PK)
    log.info("created the node certificate authority")
    return made


def ca_certificate_pem() -> str:
    """Return the CA certificate (PEM), or "" before any node got a certificate."""
    found = NodeAuthority.objects.filter(pk=_AUTHORITY_PK).only("certificate_pem").first()
    return found.certificate_pem if found is not None else ""


def _ca_key(row: NodeAuthority) -> ec.EllipticCurvePrivateKey:
    try:
        key_pem = _fernet().decrypt(row.encrypted_key.encode())
    except InvalidToken:
        raise AuthorityUnreadable(
            "the node CA's key cannot be decrypted: SECRET_KEY changed since it was made "
            "(restore the old SECRET_KEY; or delete the NodeAuthority row and make every "
            "node join again)") from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def parse_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Return the request if it is well formed, self-signed and uses an accepted key."""
    if not csr_pem or len(csr_pem) > MAX_CSR_CHARS:
        raise CertificateRequestError(f"csr_pem must be a PEM certificate signing request "
                                      f"of at most {MAX_CSR_CHARS} characters")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm,
            x509.UnsupportedGeneralNameType) as error:
        raise CertificateRequestError(f"csr_pem is not a valid certificate signing request: "
                                      f"{error}") from None
    if not valid:
        raise CertificateRequestError("csr_pem's signature does not match its key")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _EC_CURVES):
            raise CertificateRequestError("csr_pem: EC keys must be on P-256 or P-384")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < _MIN_RSA_BITS:
            raise CertificateRequestError(f"csr_pem: RSA keys need {_MIN_RSA_BITS} bits")
    else:
        raise CertificateRequestError("csr_pem: the key must be EC (P-256, P-384) or RSA")
    return csr


def subject_alternative_names(address: str, node_id: int) -> list[x509.GeneralName]:
    """Return the SANs of a node's certificate: its address (IP or DNS name) and its id."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"urn:swarm:node:{node_id}")]
    try:
        names.insert(0, x509.IPAddress(ipaddress.ip_address(address)))
    except ValueError:
        try:
            names.insert(0, x509.DNSName(address))
        except ValueError as error:
            raise CertificateRequestError(f"the address {address!r} cannot be named in a "
                                          f"certificate: {error}") from None
    return names


def issue_node_certificate(csr: x509.CertificateSigningRequest, node_id: int, address: str,
                           now: datetime) -> IssuedCertificate:
    """Sign a certificate for node `node_id` at `address` with the CSR's public key."""
    row = authority(now)
    ca_certificate = x509.load_pem_x509_certificate(row.certificate_pem.encode())
    ca_key = _ca_key(row)
    not_after = now + NODE_CERT_LIFETIME
    public_key = csr.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                    f"swarm-node-{node_id}")]))
        .issuer_name(ca_certificate.subject).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(subject_alternative_names(address, node_id)),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    return IssuedCertificate(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        sha256=key_pin(certificate.public_key()),
        serial_hex=f"{certificate.serial_number:x}",
        not_after=not_after)
