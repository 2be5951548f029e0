"""Clear this run's cache keys only.

`cache.clear()` on Django's Redis backend is FLUSHDB: it also wipes the keys of the other
xdist worker (and of any other run on the machine), which share one Redis under their own
key prefixes. A failed-login counter of a test on one worker vanished that way while
the other worker's test cleared "its" cache (seen in a CI run). This deletes only the keys
under this process's prefix (tests/settings.py gives each worker its own).
"""

from __future__ import annotations

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache


def clear_own_cache() -> None:
    """Delete every cache key of this run (its KEY_PREFIX); other runs' keys stay."""
    backend = caches["default"]  # `cache` is a proxy: isinstance needs the backend itself
    if not isinstance(backend, RedisCache):
        backend.clear()  # the file cache lives in this run's own folder
        return
    client = backend._cache.get_client(write=True)
    prefix = settings.CACHES["default"]["KEY_PREFIX"]
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)
