"""Prefix affinity (pure: no Django, no I/O): prompts that share a prefix go to one replica.

A replica that keeps the KV cache of prompts it has seen (vLLM's prefix caching, SGLang's
radix cache) prefills a repeated prefix (a long system prompt, a chat's earlier turns)
for free; that only pays if requests sharing the prefix land on the same replica.
Rendezvous (highest random weight) hashing of the prompt's first `prefix_chars`
characters ranks the replicas per prefix: adding or removing one replica moves only the
prefixes it wins or won, no ring to rebuild. Load still wins over affinity: the first
replica in that order whose outstanding count is within `slack` of the least loaded one
takes the request (bounded-load consistent hashing), so a hot prefix spills over to its
second choice instead of queueing on one replica.

Our own replica keeps no cache between sequences (docs/architecture.md, "Generative
models at the replica"), so the gateway leaves this off unless a deployment asks for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

DEFAULT_PREFIX_CHARS = 256
DEFAULT_SLACK = 2


def prefix_key(text: str, prefix_chars: int = DEFAULT_PREFIX_CHARS) -> bytes:
    """Return the affinity key of a prompt: its first `prefix_chars` characters, UTF-8."""
    return text[:max(0, prefix_chars)].encode("utf-8", "surrogatepass")


def rendezvous_weight(key: bytes, replica_id: int) -> int:
    """Return the replica's 64-bit weight for a key (the same on every gateway)."""
    # blake2b, not hash(): Python salts str hashes per process, and every gateway process
    # must rank the replicas alike.
    seed = replica_id.to_bytes(8, "big", signed=True)
    digest = hashlib.blake2b(seed + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: bytes, replica_ids: Iterable[int]) -> list[int]:
    """Return the replica ids, best first for `key` (ties broken by id)."""
    return sorted(replica_ids, key=lambda rid: (-rendezvous_weight(key, rid), rid))


def affinity_choice(key: bytes, outstanding_by_replica: Mapping[int, int],
                    slack: int = DEFAULT_SLACK) -> int | None:
    """Return the replica for a request with this key, None when there is none.

    `outstanding_by_replica`: the eligible replicas (id -> requests in flight). The first
    replica in rendezvous order whose count is at most the lowest count plus `slack`
    (>= 0) wins; the least loaded always qualifies, so there is an answer whenever there
    is a replica.
    """
    if not outstanding_by_replica:
        return None
    bound = min(outstanding_by_replica.values()) + max(0, slack)
    for replica_id in rendezvous_order(key, outstanding_by_replica):
        if outstanding_by_replica[replica_id] <= bound:
            return replica_id
    return None  # unreachable: the least loaded replica is within the bound

