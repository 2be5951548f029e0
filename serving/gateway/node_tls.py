"""How the gateway checks a replica it reaches directly: TLS to the portal's CA, pinned.

A replica on a node that joined with a certificate (serving/node_ca.py) is reached over TLS
with a context that trusts only the portal's node CA and checks the node's address against
the certificate's names; then the certificate itself must be the one the routing table names
for that node (`ReplicaRoute.tls_sha256`, the sha256 of its public key: a renewed
certificate for the same key keeps it). So a machine that did not join cannot pass for a
replica, and a certificate the portal no longer lists (a removed node, or one that joined
again with a new key) is refused from the next table on. A replica with no fingerprint in
the table (a loopback node) is reached over plain HTTP.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from serving.gateway.routes import RouteTable


class PinMismatch(ssl.SSLError):
    """The replica's certificate is valid for the CA but not the one the table names."""


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS for one replica: the CA context, the certificate it must show (sha256 hex) and
    the name it must carry (the node's address, also when a tunnel carries the bytes)."""

    context: ssl.SSLContext
    sha256: str
    server_name: str


@functools.lru_cache(maxsize=8)
def context_for(ca_pem: str) -> ssl.SSLContext:
    """Return a client context trusting only `ca_pem` ("": trusting nothing at all)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pem:
        context.load_verify_locations(cadata=ca_pem)
    return context


def upstream_tls(ca_pem: str, sha256: str, server_name: str) -> UpstreamTls | None:
    """Return how to reach a replica whose node at `server_name` shows certificate `sha256`
    ("": plain HTTP)."""
    if not sha256:
        return None
    return UpstreamTls(context_for(ca_pem), sha256.lower(), server_name)


def replica_tls(table: RouteTable) -> dict[int, UpstreamTls]:
    """Return {replica id: its TLS} for the table's replicas that serve TLS.

    Taken from the table as the portal sent it: a tunnel may reroute a replica to a
    loopback port, but the certificate still names the node's own address.
    """
    return {replica.replica_id: tls for route in table.deployments.values()
            for replica in route.replicas
            if (tls := upstream_tls(table.node_ca_pem, replica.tls_sha256, replica.host))}


def key_pin_of(der: bytes | None) -> str:
    """Return the sha256 hex of a DER certificate's SubjectPublicKeyInfo ("" for none)."""
    if not der:
        return ""
    spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def check_pinned(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, tls: UpstreamTls) -> None:
    """Raise PinMismatch unless the peer's certificate holds the pinned key."""
    shown = key_pin_of(ssl_object.getpeercert(binary_form=True) if ssl_object else None)
    if not hmac.compare_digest(shown, tls.sha256):
        raise PinMismatch(f"the replica's key ({shown[:16] or 'none'}...) is not the one its "
                          f"node holds ({tls.sha256[:16]}...)")
