"""clear_own_cache deletes this run's keys and leaves another run's (a shared Redis)."""

from __future__ import annotations

import pytest
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache

from tests.cache_tools import clear_own_cache


def test_clearing_keeps_the_keys_of_other_runs() -> None:
    if not isinstance(caches["default"], RedisCache):
        pytest.skip("the file cache is this run's own folder: cache.clear() is safe there")
    client = caches["default"]._cache.get_client(write=True)
    client.set("another-run:1:counter", b"7", ex=60)
    cache.set("mine", 1, timeout=60)
    clear_own_cache()
    assert cache.get("mine") is None
    assert client.get("another-run:1:counter") == b"7"
    client.delete("another-run:1:counter")
