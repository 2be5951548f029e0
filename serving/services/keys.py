"""API keys for /v2: created with the secret shown once, scoped, expiring, revocable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from serving import live, secrets
from serving.models import MAX_TOKENS_PER_MINUTE, ApiKey, Deployment
from swarm_portal.errors import ServiceError

API_KEY_PREFIX = "swk_"


def do_create_api_key(*, name: str, user: Any, deployments: list[str] | None,
                      expires_in: timedelta | None, rate_limit_rps: float | None,
                      burst: int = 0,
                      tokens_per_minute: int | None = None) -> tuple[ApiKey, str]:
    """Create a key scoped to the named deployments (None: all); return it and its secret.

    `tokens_per_minute` (1 to MAX_TOKENS_PER_MINUTE, None: unlimited) limits the tokens of
    generative answers; ServiceError names a value out of range or an unknown deployment.
    """
    _check_tokens_per_minute(tokens_per_minute)
    secret = API_KEY_PREFIX + secrets.new_join_token().removeprefix(secrets.JOIN_TOKEN_PREFIX)
    with transaction.atomic():
        key = ApiKey.objects.create(
            name=name, prefix=secret[:10], key_hash=secrets.digest(secret),
            all_deployments=deployments is None, rate_limit_rps=rate_limit_rps, burst=burst,
            rate_limit_tokens_per_minute=tokens_per_minute,
            expires_at=timezone.now() + expires_in if expires_in else None, created_by=user)
        if deployments is not None:
            found = list(Deployment.objects.filter(name__in=deployments))
            unknown = sorted(set(deployments) - {d.name for d in found})
            if unknown:
                raise ServiceError(f"no deployment named {unknown[0]!r}")
            key.deployments.set(found)
        live.bump_routes_on_commit()
    return key, secret


def _check_tokens_per_minute(tokens_per_minute: int | None) -> None:
    # The serializer and the form check too; this guards the other callers (commands).
    if tokens_per_minute is not None and not 1 <= tokens_per_minute <= MAX_TOKENS_PER_MINUTE:
        raise ServiceError(f"tokens per minute must be 1 to {MAX_TOKENS_PER_MINUTE}")


def do_revoke_api_key(key: ApiKey) -> None:
    """Revoke a key: every gateway refuses it within a second."""
    with transaction.atomic():
        ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now())
        live.bump_routes_on_commit()


LAST_USED_RESOLUTION_S = 60.0  # last_used_at is written at most once a minute per key


def record_keys_used(used_s: dict[int, float], now_s: float) -> int:
    """Set last_used_at from gateways' {key id: unix s} (clamped to now_s); unknown ids are
    ignored. One read, then one UPDATE per key whose stored time is a minute older (so each
    key is written at most once a minute). Return the number of keys written."""
    if not used_s:
        return 0
    at = {pk: datetime.fromtimestamp(min(at_s, now_s), UTC) for pk, at_s in used_s.items()}
    stored = ApiKey.objects.filter(pk__in=at).values_list("pk", "last_used_at")
    due = {pk: at[pk] for pk, last in stored
           if last is None or (at[pk] - last).total_seconds() >= LAST_USED_RESOLUTION_S}
    for pk, when in due.items():
        # A concurrent report may have moved the key on: never move last_used_at back.
        ApiKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=when),
                              pk=pk).update(last_used_at=when)
    return len(due)
