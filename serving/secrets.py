"""Secrets of the serving side: join tokens, node secrets, replica keys.

Join tokens and node secrets are random, shown once and stored as sha256 digests
(they have 256 bits of entropy, so a fast hash is enough). The replica key, which
the gateway sends to a node's replicas, is derived from the node id with an HMAC
under SECRET_KEY: the portal can recompute it any time and stores it nowhere.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from django.conf import settings

from serving.agent.protocol import NODE_SECRET_PREFIX

JOIN_TOKEN_PREFIX = "swj_"  # noqa: S105 - a prefix, not a secret


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_join_token() -> str:
    return JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_node_secret(node_id: int) -> str:
    return f"{NODE_SECRET_PREFIX}{node_id}_{secrets.token_urlsafe(32)}"


def node_id_from_secret(secret: str) -> int | None:
    """Return the node id embedded in a node secret, or None when it is malformed."""
    if not secret.startswith(NODE_SECRET_PREFIX):
        return None
    node_part, _, rest = secret[len(NODE_SECRET_PREFIX):].partition("_")
    return int(node_part) if node_part.isdigit() and rest else None


def replica_key(node_id: int) -> str:
    """Return the key a node's replicas require from the gateway."""
    message = f"swarm-replica-key:{node_id}".encode()
    return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)
