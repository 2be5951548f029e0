"""Secrets of the serving side: join tokens, node secrets, replica keys.

Join tokens and node secrets are random, shown once and stored as sha256 digests
(they have 256 bits of entropy, so a fast hash is enough). The replica key, which
the gateway sends to a node's replicas, is derived from the node id with an HMAC
under SECRET_KEY: the portal can recompute it any time and stores it nowhere.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from django.conf import settings

from swarm_protocol.agent_messages import NODE_SECRET_PREFIX

JOIN_TOKEN_PREFIX = "swj_"  # noqa: S105 - a prefix, not a secret
# Ours are ~60 characters; anything much longer is refused before it is parsed or looked up.
MAX_SECRET_CHARS = 200
MAX_NODE_ID = 2**63 - 1  # the database's primary key is a signed 64-bit integer
# ASCII digits and base64url only: str.isdigit() also accepts "²", which int() refuses.
_NODE_SECRET = re.compile(
    re.escape(NODE_SECRET_PREFIX) + r"([1-9][0-9]{0,18})_([A-Za-z0-9_-]{1,128})", re.ASCII)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_join_token() -> str:
    return JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_node_secret(node_id: int) -> str:
    return f"{NODE_SECRET_PREFIX}{node_id}_{secrets.token_urlsafe(32)}"


def node_id_from_secret(secret: str) -> int | None:
    """Return the node id embedded in a node secret, or None when it is malformed."""
    if len(secret) > MAX_SECRET_CHARS:
        return None
    found = _NODE_SECRET.fullmatch(secret)
    if found is None:
        return None
    node_id = int(found.group(1))
    return node_id if node_id <= MAX_NODE_ID else None


def replica_key(node_id: int) -> str:
    """Return the key a node's replicas require from the gateway."""
    message = f"swarm-replica-key:{node_id}".encode()
    return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)


def bearer_secret(authorization: str) -> str | None:
    """Return the credential of an `Authorization: Bearer <secret>` header, or None.

    Bounded before anything else: an over-long header is refused without parsing it.
    """
    if len(authorization) > MAX_SECRET_CHARS + len("Bearer "):
        return None
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme != "Bearer" or not credential or not credential.isascii():
        return None
    return credential
