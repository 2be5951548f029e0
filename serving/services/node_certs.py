"""Node certificates at join and renewal (the CA itself is serving/node_ca.py).

A node joins with a CSR for a key it made (plain HTTP is for loopback addresses only), gets a
certificate for its address, and renews it for the same key in a heartbeat during the last
third of its life. Gateways pin the key (Node.cert_sha256), so a renewal changes no table.
"""

from __future__ import annotations

import logging
from datetime import datetime

from cryptography import x509

from serving import node_ca
from serving.models import Node
from swarm_portal.errors import ServiceError
from swarm_protocol.addresses import is_loopback_host
from swarm_protocol.agent_messages import RegisterRequest

log = logging.getLogger(__name__)


def certificate_request(message: RegisterRequest) -> x509.CertificateSigningRequest | None:
    """Return the join's parsed CSR; None for a plain-HTTP node, allowed on loopback only.

    Traffic to a loopback address never leaves the machine, so TLS there would protect
    nothing from anyone who could not read the replica key anyway (root on that host).
    """
    if message.csr_pem:
        return node_ca.parse_csr(message.csr_pem)
    if not is_loopback_host(message.address):
        raise ServiceError("this node must serve TLS: send csr_pem (a certificate signing "
                           "request for its key; swarm-worker does so unless --tls off, "
                           "which only loopback addresses may use)")
    return None


def issue_certificate(node: Node, csr: x509.CertificateSigningRequest | None,
                      now: datetime) -> node_ca.IssuedCertificate | None:
    """Sign the node's certificate and record its key's pin, which gateways check."""
    if csr is None:
        return None
    issued = node_ca.issue_node_certificate(csr, node.pk, node.address, now)
    node.cert_sha256, node.cert_serial = issued.sha256, issued.serial_hex
    node.cert_expires_at = issued.not_after
    node.save(update_fields=["cert_sha256", "cert_serial", "cert_expires_at"])
    return issued


def renewed_certificate(node: Node, csr_pem: str, now: datetime) -> str:
    """Return a new certificate for the node's own key when it asks within the renewal
    window (the last third of its certificate's life), else "" (asked too early: nothing
    is signed, so a node cannot make the portal sign at heartbeat rate).

    The key must be the pinned one: a new key needs a new join, so that every gateway's pin
    changes with it.
    """
    if not csr_pem or not node.cert_sha256:
        return ""
    if node.cert_expires_at is not None and (
            node.cert_expires_at - now > node_ca.NODE_CERT_LIFETIME / 3):
        return ""
    csr = node_ca.parse_csr(csr_pem)
    if node_ca.key_pin(csr.public_key()) != node.cert_sha256:
        raise ServiceError("csr_pem: a renewal must keep this node's key (a new key needs a "
                           "new join)")
    issued = node_ca.issue_node_certificate(csr, node.pk, node.address, now)
    Node.objects.filter(pk=node.pk).update(cert_serial=issued.serial_hex,
                                           cert_expires_at=issued.not_after)
    log.info("node %s (#%s): certificate renewed until %s", node.name, node.pk,
             issued.not_after.isoformat())
    return issued.certificate_pem
