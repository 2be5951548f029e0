"""The gateway's per-key token buckets, driven by an explicit clock (pure, no I/O)."""

from __future__ import annotations

import math

import pytest

from serving.gateway.ratelimit import RateLimiter, TokenBucket, bucket_shape, retry_after_s
from tests.gateway_helpers import api_key


def test_a_new_bucket_allows_a_full_burst_then_says_how_long_to_wait():
    bucket = TokenBucket.full(rate_per_s=2.0, capacity=3.0, now_s=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # one token every 0.5 s at 2/s


def test_tokens_come_back_at_the_rate_and_never_beyond_the_capacity():
    bucket = TokenBucket.full(rate_per_s=2.0, capacity=3.0, now_s=0.0)
    for _ in range(3):
        bucket.take(0.0)
    assert bucket.take(0.25) == pytest.approx(0.25)  # half a token so far
    assert bucket.take(0.5) == 0.0
    assert [bucket.take(1000.0) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]


def test_a_clock_that_steps_back_mints_no_tokens():
    bucket = TokenBucket.full(rate_per_s=1.0, capacity=1.0, now_s=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) > 0
    assert bucket.take(10.5) == pytest.approx(0.5)


def test_a_zero_rate_refuses_forever_once_the_burst_is_spent():
    bucket = TokenBucket.full(rate_per_s=0.0, capacity=1.0, now_s=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(1e9) == math.inf


def test_burst_zero_means_one_second_of_rate_and_at_least_one():
    assert bucket_shape(api_key("a", 1, rate_limit_rps=5.0)) == (5.0, 5.0)
    assert bucket_shape(api_key("a", 1, rate_limit_rps=0.2)) == (0.2, 1.0)
    assert bucket_shape(api_key("a", 1, rate_limit_rps=5.0, burst=20)) == (5.0, 20.0)
    assert bucket_shape(api_key("a", 1)) is None


def test_the_limiter_keeps_one_bucket_per_key():
    limiter = RateLimiter()
    slow, other = api_key("s", 1, rate_limit_rps=1.0), api_key("o", 2, rate_limit_rps=1.0)
    assert limiter.wait_s(slow, 0.0) == 0.0
    assert limiter.wait_s(slow, 0.0) == pytest.approx(1.0)
    assert limiter.wait_s(other, 0.0) == 0.0  # another key has its own bucket


def test_unlimited_keys_are_never_refused():
    limiter = RateLimiter()
    free = api_key("f", 1)
    assert all(limiter.wait_s(free, 0.0) == 0.0 for _ in range(1000))


def test_a_changed_limit_reshapes_the_bucket():
    limiter = RateLimiter()
    assert limiter.wait_s(api_key("k", 1, rate_limit_rps=1.0), 0.0) == 0.0
    assert limiter.wait_s(api_key("k", 1, rate_limit_rps=1.0), 0.0) > 0
    raised = api_key("k", 1, rate_limit_rps=10.0)
    assert [limiter.wait_s(raised, 0.0) for _ in range(10)] == [0.0] * 10


def test_forgetting_a_key_refills_its_bucket():
    limiter = RateLimiter()
    key = api_key("k", 7, rate_limit_rps=1.0)
    limiter.wait_s(key, 0.0)
    assert limiter.wait_s(key, 0.0) > 0
    limiter.forget_all_but({8})
    assert limiter.wait_s(key, 0.0) == 0.0


@pytest.mark.parametrize(("wait_s", "header"), [
    (0.01, 1), (1.0, 1), (1.2, 2), (59.5, 60), (1e9, 3600), (math.inf, 3600)])
def test_retry_after_is_whole_seconds_between_one_and_an_hour(wait_s, header):
    assert retry_after_s(wait_s) == header
