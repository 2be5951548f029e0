"""Test settings: the production settings module, with safe defaults for what is unset."""

from __future__ import annotations

import os
import tempfile

if (worker := os.environ.get("PYTEST_XDIST_WORKER")) \
        and os.environ.get("SWARM_TESTS_OWN_DIRS") != worker:
    # An xdist worker inherits the controller's folder and key prefix: take its own, as
    # another run would (the file cache and the broker live in that folder). Once only:
    # the processes a worker's tests start inherit the marker, and keep what they are given.
    os.environ["SWARM_VAR_DIR"] = tempfile.mkdtemp(prefix=f"swarm-portal-tests-{worker}-")
    os.environ["CACHE_KEY_PREFIX"] = f"swarm-test-{os.getpid()}"
    os.environ["SWARM_TESTS_OWN_DIRS"] = worker
os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-use-0123456789")
# A folder per run: two runs on one machine must not share a test database file.
os.environ.setdefault("SWARM_VAR_DIR", tempfile.mkdtemp(prefix="swarm-portal-tests-"))
os.environ.setdefault("SECURE_COOKIES", "0")
# Runs share one Redis in CI: keys of one run (and its server processes) never meet another's.
os.environ.setdefault("CACHE_KEY_PREFIX", f"swarm-test-{os.getpid()}")

from swarm_portal.settings import *  # noqa: F403
from swarm_portal.settings import DATABASES, VAR_DIR

# Threads that tests start (async views) must not keep connections open past a test.
DATABASES["default"]["CONN_MAX_AGE"] = 0
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not memory, so that server processes started by tests share the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast test logins
