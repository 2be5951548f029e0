"""API keys for /v2: created with the secret shown once, scoped, expiring, revocable."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from serving import live, secrets
from serving.models import ApiKey, Deployment
from swarm_portal.errors import ServiceError

API_KEY_PREFIX = "swk_"


def do_create_api_key(*, name: str, user: Any, deployments: list[str] | None,
                      expires_in: timedelta | None, rate_limit_rps: float | None,
                      burst: int = 0) -> tuple[ApiKey, str]:
    """Create a key scoped to the named deployments (None: all); return it and its secret."""
    secret = API_KEY_PREFIX + secrets.new_join_token().removeprefix(secrets.JOIN_TOKEN_PREFIX)
    with transaction.atomic():
        key = ApiKey.objects.create(
            name=name, prefix=secret[:10], key_hash=secrets.digest(secret),
            all_deployments=deployments is None, rate_limit_rps=rate_limit_rps, burst=burst,
            expires_at=timezone.now() + expires_in if expires_in else None, created_by=user)
        if deployments is not None:
            found = list(Deployment.objects.filter(name__in=deployments))
            unknown = sorted(set(deployments) - {d.name for d in found})
            if unknown:
                raise ServiceError(f"no deployment named {unknown[0]!r}")
            key.deployments.set(found)
        live.bump_routes_on_commit()
    return key, secret


def do_revoke_api_key(key: ApiKey) -> None:
    """Revoke a key: every gateway refuses it within a second."""
    with transaction.atomic():
        ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now())
        live.bump_routes_on_commit()
