"""Per-key limits in tokens of generative answers: the bucket (fake clock) and the table field.

A key with `tokens_per_minute = N` has a bucket of N tokens refilled at N/60 per second.
The gateway asks `tokens_wait_s` before a generative request and charges the answer's
tokens afterwards with `debit_tokens`, which may drive the bucket below zero.
"""

from __future__ import annotations

import math

import pytest

from serving.gateway.ratelimit import MIN_TOKENS_WAIT_S, RateLimiter, tokens_shape
from serving.gateway.routes import ApiKeyRoute, RouteTable
from tests.gateway_helpers import api_key


def limited(per_minute: int | None, key_id: int = 1) -> ApiKeyRoute:
    return api_key(f"secret-{key_id}", key_id, tokens_per_minute=per_minute)


def test_a_new_key_may_spend_a_whole_minute_at_once():
    limiter, key = RateLimiter(), limited(600)
    assert limiter.tokens_wait_s(key, 0.0) == 0.0
    limiter.debit_tokens(key, 599, 0.0)
    assert limiter.tokens_wait_s(key, 0.0) == 0.0  # one token left: still positive
    limiter.debit_tokens(key, 1, 0.0)
    assert limiter.tokens_wait_s(key, 0.0) == MIN_TOKENS_WAIT_S  # empty: positive at once


def test_tokens_come_back_at_a_sixtieth_of_the_limit_per_second():
    limiter, key = RateLimiter(), limited(600)  # 10 tokens/s
    limiter.debit_tokens(key, 650, 0.0)  # 50 in debt
    assert limiter.tokens_wait_s(key, 0.0) == pytest.approx(5.0)
    assert limiter.tokens_wait_s(key, 3.0) == pytest.approx(2.0)
    assert limiter.tokens_wait_s(key, 5.1) == 0.0


def test_one_long_answer_is_charged_in_full_and_the_next_request_waits_it_out():
    limiter, key = RateLimiter(), limited(60)  # 1 token/s
    assert limiter.tokens_wait_s(key, 0.0) == 0.0
    limiter.debit_tokens(key, 300, 0.0)  # five minutes' worth in one answer
    assert limiter.tokens_wait_s(key, 0.0) == pytest.approx(240.0)
    assert limiter.tokens_wait_s(key, 239.0) == pytest.approx(1.0)
    assert limiter.tokens_wait_s(key, 241.0) == 0.0


def test_an_idle_key_saves_up_at_most_one_minute():
    limiter, key = RateLimiter(), limited(60)
    limiter.debit_tokens(key, 60, 0.0)
    limiter.debit_tokens(key, 60, 1e6)  # idle for days: the bucket was full, not fuller
    assert limiter.tokens_wait_s(key, 1e6) == MIN_TOKENS_WAIT_S


def test_a_clock_that_steps_back_mints_no_tokens():
    limiter, key = RateLimiter(), limited(60)
    limiter.debit_tokens(key, 70, 100.0)
    assert limiter.tokens_wait_s(key, 50.0) == pytest.approx(10.0)
    assert limiter.tokens_wait_s(key, 105.0) == pytest.approx(5.0)


def test_a_negative_or_zero_count_changes_nothing():
    limiter, key = RateLimiter(), limited(60)
    limiter.debit_tokens(key, 60, 0.0)
    limiter.debit_tokens(key, -1000, 0.0)
    limiter.debit_tokens(key, 0, 0.0)
    assert limiter.tokens_wait_s(key, 0.0) == MIN_TOKENS_WAIT_S


def test_keys_without_a_token_limit_are_never_held_and_keep_no_bucket():
    limiter, free = RateLimiter(), limited(None)
    for _ in range(100):
        limiter.debit_tokens(free, 10**9, 0.0)
        assert limiter.tokens_wait_s(free, 0.0) == 0.0
    assert len(limiter) == 0
    assert tokens_shape(free) is None


def test_each_key_has_its_own_token_bucket():
    limiter, spent, other = RateLimiter(), limited(60, 1), limited(60, 2)
    limiter.debit_tokens(spent, 120, 0.0)
    assert limiter.tokens_wait_s(spent, 0.0) > 0
    assert limiter.tokens_wait_s(other, 0.0) == 0.0


def test_a_changed_limit_keeps_the_debt_and_refills_at_the_new_rate():
    limiter = RateLimiter()
    limiter.debit_tokens(limited(60), 120, 0.0)  # 60 in debt at 1 token/s
    raised = limited(600)  # now 10 tokens/s
    assert limiter.tokens_wait_s(raised, 0.0) == pytest.approx(6.0)
    limiter.tokens_wait_s(raised, 1000.0)  # full again, at the new capacity
    limiter.debit_tokens(raised, 600, 1000.0)
    assert limiter.tokens_wait_s(raised, 1000.0) > 0
    lowered = limited(6, 1)
    assert limiter.tokens_wait_s(lowered, 2000.0) == 0.0
    limiter.debit_tokens(lowered, 7, 2000.0)  # capped at 6, not the 600 saved before
    assert limiter.tokens_wait_s(lowered, 2000.0) == pytest.approx(10.0)


def test_lifting_a_limit_drops_the_keys_token_bucket():
    limiter = RateLimiter()
    limiter.debit_tokens(limited(60), 600, 0.0)
    assert len(limiter) == 1
    assert limiter.tokens_wait_s(limited(None), 0.0) == 0.0
    assert len(limiter) == 0


def test_token_buckets_are_forgotten_with_their_key():
    limiter, key = RateLimiter(), api_key("k", 7, tokens_per_minute=60, rate_limit_rps=1.0)
    limiter.debit_tokens(key, 600, 0.0)
    limiter.wait_s(key, 0.0)
    assert len(limiter) == 2  # a request bucket and a token bucket
    limiter.forget_all_but({7})
    assert len(limiter) == 2
    limiter.forget_all_but({8})
    assert len(limiter) == 0
    assert limiter.tokens_wait_s(key, 0.0) == 0.0  # a key that comes back starts full


def test_a_limit_of_zero_from_a_hand_built_table_holds_forever_once_spent():
    limiter, key = RateLimiter(), limited(0)
    limiter.debit_tokens(key, 1, 0.0)
    assert limiter.tokens_wait_s(key, 1e9) == math.inf


# the table field


def test_the_token_limit_survives_the_tables_json_form():
    table = RouteTable("r1", api_keys={"d1": limited(1000), "d2": limited(None, 2)})
    parsed = RouteTable.from_dict(table.to_dict())
    assert parsed.api_keys == table.api_keys


def test_a_table_from_an_older_portal_has_no_token_limits():
    raw = RouteTable("r1", api_keys={"d": limited(None)}).to_dict()
    del raw["api_keys"]["d"]["tokens_per_minute"]
    assert RouteTable.from_dict(raw).api_keys["d"].tokens_per_minute is None


@pytest.mark.parametrize("value", [0, -5, 1.5, "60", True, [60], {"n": 1}])
def test_a_token_limit_that_is_not_a_positive_integer_refuses_the_table(value):
    raw = RouteTable("r1", api_keys={"d": limited(None)}).to_dict()
    raw["api_keys"]["d"]["tokens_per_minute"] = value
    with pytest.raises(ValueError, match="tokens_per_minute"):
        RouteTable.from_dict(raw)
