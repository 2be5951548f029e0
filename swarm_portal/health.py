"""Liveness and readiness for load balancers and orchestrators (no credentials)."""

from __future__ import annotations

import os

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Return 200 while the process serves requests."""
    return JsonResponse({"status": "ok"})


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # any driver error means not ready
        return f"database: {exc}"
    return None


def _check_artifacts() -> str | None:
    root = settings.ARTIFACT_ROOT
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"artifact root {root} cannot be created: {exc}"
    if not os.access(root, os.W_OK):
        return f"artifact root {root} is not a writable directory"
    return None


def _check_redis() -> str | None:
    if not settings.REDIS_URL:
        return None
    import redis

    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1).ping()
    except redis.RedisError as exc:
        return f"redis: {exc}"
    return None


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Return 200 when the database, artifact storage and Redis (if configured) answer."""
    problems = [p for p in (_check_database(), _check_artifacts(), _check_redis()) if p]
    if problems:
        return JsonResponse({"status": "unavailable", "problems": problems}, status=503)
    return JsonResponse({"status": "ok"})
