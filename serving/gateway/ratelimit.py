"""Per-API-key rate limits: token buckets (pure: time is passed in)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving.gateway.routes import ApiKeyRoute


@dataclass(slots=True)
class TokenBucket:
    """`capacity` tokens, refilled at `rate_per_s`; each request takes one."""

    rate_per_s: float
    capacity: float
    tokens: float
    updated_s: float

    @classmethod
    def full(cls, rate_per_s: float, capacity: float, now_s: float) -> TokenBucket:
        """Return a bucket that starts full (a new key may burst at once)."""
        return cls(rate_per_s, capacity, capacity, now_s)

    def take(self, now_s: float) -> float:
        """Take a token: return 0.0 when one was there, else the seconds until one will be."""
        if now_s > self.updated_s:
            self.tokens = min(self.capacity,
                              self.tokens + (now_s - self.updated_s) * self.rate_per_s)
            self.updated_s = now_s  # a clock that steps back must not mint tokens
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        if self.rate_per_s <= 0:
            return math.inf
        return (1.0 - self.tokens) / self.rate_per_s


def bucket_shape(key: ApiKeyRoute) -> tuple[float, float] | None:
    """Return (rate per second, capacity) for a key, or None when it is unlimited."""
    rate_per_s = key.rate_limit_rps
    if rate_per_s is None:
        return None
    capacity = float(key.burst) if key.burst > 0 else max(1.0, rate_per_s)
    return rate_per_s, capacity


class RateLimiter:
    """One token bucket per API key, reshaped when the key's limits change."""

    def __init__(self) -> None:
        self._buckets: dict[int, TokenBucket] = {}

    def wait_s(self, key: ApiKeyRoute, now_s: float) -> float:
        """Count one request for `key`: return 0.0 if allowed, else seconds to wait."""
        shape = bucket_shape(key)
        if shape is None:
            return 0.0
        bucket = self._buckets.get(key.key_id)
        if bucket is None or (bucket.rate_per_s, bucket.capacity) != shape:
            bucket = self._buckets[key.key_id] = TokenBucket.full(*shape, now_s)
        return bucket.take(now_s)

    def __len__(self) -> int:
        return len(self._buckets)

    def forget_all_but(self, key_ids: set[int]) -> None:
        """Drop the buckets of keys no longer in the table."""
        for key_id in [k for k in self._buckets if k not in key_ids]:
            del self._buckets[key_id]


def retry_after_s(wait_s: float) -> int:
    """Return a Retry-After value in whole seconds (at least 1, at most an hour)."""
    if not math.isfinite(wait_s):
        return 3600
    return max(1, min(3600, math.ceil(wait_s)))
