"""`make test` runs on two pytest-xdist workers; the real-process tests stay on one.

Tests marked `slow` start real servers, agents and Celery and time what they see (drain
windows, heartbeats, held requests). Two of them at once on a 2-core machine would make
each other late, so they form one xdist group (`--dist loadgroup`): they run one after
another on one worker while the other worker takes the quick tests.

Loaded with `-p tests.parallel` (the Makefile's `test`); imports no Django.
"""

from __future__ import annotations

import pytest

REAL_PROCESSES_GROUP = "real-processes"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put every `slow` test into the one real-processes xdist group."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(REAL_PROCESSES_GROUP))
