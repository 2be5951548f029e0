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

    def refill(self, now_s: float) -> None:
        """Add the tokens earned since the last look, up to the capacity."""
        if now_s > self.updated_s:
            self.tokens = min(self.capacity,
                              self.tokens + (now_s - self.updated_s) * self.rate_per_s)
            self.updated_s = now_s  # a clock that steps back must not mint tokens

    def take(self, now_s: float) -> float:
        """Take a token: return 0.0 when one was there, else the seconds until one will be."""
        self.refill(now_s)
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


def tokens_shape(key: ApiKeyRoute) -> tuple[float, float] | None:
    """Return (tokens per second, capacity) of a key's bucket of generated tokens, or None
    when it is unlimited: a minute's worth, refilled evenly over the minute."""
    per_minute = key.tokens_per_minute
    if per_minute is None:
        return None
    return per_minute / 60.0, float(per_minute)


# An empty bucket is positive an instant after its wait ends: the wait is never 0.0 then.
MIN_TOKENS_WAIT_S = 0.001


class RateLimiter:
    """Two token buckets per API key (requests, and tokens of generative answers),
    reshaped when the key's limits change and forgotten with the key."""

    def __init__(self) -> None:
        self._buckets: dict[int, TokenBucket] = {}
        self._token_buckets: dict[int, TokenBucket] = {}  # in generated tokens

    def wait_s(self, key: ApiKeyRoute, now_s: float) -> float:
        """Count one request for `key`: return 0.0 if allowed, else seconds to wait."""
        shape = bucket_shape(key)
        if shape is None:
            return 0.0
        bucket = self._buckets.get(key.key_id)
        if bucket is None or (bucket.rate_per_s, bucket.capacity) != shape:
            bucket = self._buckets[key.key_id] = TokenBucket.full(*shape, now_s)
        return bucket.take(now_s)

    def tokens_wait_s(self, key: ApiKeyRoute, now_s: float) -> float:
        """Return 0.0 while `key`'s token bucket is positive (or it has no token limit),
        else the seconds until it is again (at least MIN_TOKENS_WAIT_S). Takes nothing:
        the answer's tokens are charged afterwards with `debit_tokens`."""
        bucket = self._token_bucket(key, now_s)
        if bucket is None:
            return 0.0
        bucket.refill(now_s)
        if bucket.tokens > 0:
            return 0.0
        if bucket.rate_per_s <= 0:  # a table built by hand may say 0 (the portal says >= 1)
            return math.inf
        return max(-bucket.tokens / bucket.rate_per_s, MIN_TOKENS_WAIT_S)

    def debit_tokens(self, key: ApiKeyRoute, tokens: int, now_s: float) -> None:
        """Charge `tokens` (a count >= 0) to `key`'s token bucket. The bucket may go
        negative: one long answer is charged in full, and the key's next request waits."""
        bucket = self._token_bucket(key, now_s)
        if bucket is None or tokens <= 0:  # a negative count must not mint tokens
            return
        bucket.refill(now_s)
        bucket.tokens -= tokens

    def _token_bucket(self, key: ApiKeyRoute, now_s: float) -> TokenBucket | None:
        shape = tokens_shape(key)
        if shape is None:
            self._token_buckets.pop(key.key_id, None)  # a lifted limit keeps no bucket
            return None
        bucket = self._token_buckets.get(key.key_id)
        if bucket is None:
            bucket = self._token_buckets[key.key_id] = TokenBucket.full(*shape, now_s)
        elif (bucket.rate_per_s, bucket.capacity) != shape:
            # A changed limit keeps the level (and any debt): a new limit is no fresh minute.
            bucket.refill(now_s)
            bucket.rate_per_s, bucket.capacity = shape
            bucket.tokens = min(bucket.tokens, bucket.capacity)
        return bucket

    def __len__(self) -> int:
        """Return the number of buckets of both kinds (bounded by the keys in the table)."""
        return len(self._buckets) + len(self._token_buckets)

    def forget_all_but(self, key_ids: set[int]) -> None:
        """Drop the buckets of keys no longer in the table."""
        for buckets in (self._buckets, self._token_buckets):
            for key_id in [k for k in buckets if k not in key_ids]:
                del buckets[key_id]


def retry_after_s(wait_s: float) -> int:
    """Return a Retry-After value in whole seconds (at least 1, at most an hour)."""
    if not math.isfinite(wait_s):
        return 3600
    return max(1, min(3600, math.ceil(wait_s)))
