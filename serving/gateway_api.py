"""The gateway API: what a `swarm-gateway` process (any host) asks of the portal.

Plain Django views, like the agent API: every gateway polls the table five times a second,
and almost every poll is a 304 that costs one indexed query and three cache reads. Every
call carries `Authorization: Bearer <gateway token>` (`manage.py create_gateway_token`).
Every answer is JSON: bad input a 4xx naming the problem, a cache or database outage a
503 with Retry-After (the gateway keeps its last table and asks again), never a 500.

- GET  table?instance=<id>  -> the RouteTable JSON with an ETag (304 for If-None-Match)
- POST sessions             {"session_key": str} -> {"allowed": bool}
- POST activations          {"deployment_id": int, "held": int} -> 202
- POST successes            {"replicas": {"<replica id>": unix s},
                              "keys": {"<API key id>": unix s} (optional)} -> 204
"""

from __future__ import annotations

import hmac
import json
import math
import re
import secrets as token_secrets
import time
from collections.abc import Callable
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from kombu.exceptions import KombuError

from serving import live, secrets
from serving.gateway.limits import MAX_CREDENTIAL_BYTES
from serving.gateway_source import route_table, session_user_active, share_caps
from serving.models import GatewayToken
from serving.services import reachability
from serving.services.keys import record_keys_used
from swarm_portal import activation
from swarm_portal.errors import ServiceError
from swarm_protocol.wire_numbers import parse_count

GATEWAY_TOKEN_PREFIX = "swg_"  # noqa: S105 - a prefix, not a secret
MAX_BODY_BYTES = 1024 * 1024  # 10,000 successes are about 400 KB
MAX_SUCCESSES = 10_000
MAX_KEYS_USED = 10_000
MAX_HELD = 1_000_000
RETRY_AFTER_S = 1
_INSTANCE = re.compile(r"[A-Za-z0-9_.:-]{1,64}", re.ASCII)
# Cookie values are printable ASCII; anything else (a NUL, a lone surrogate) cannot be a
# session key, and some databases refuse to even compare it.
_SESSION_KEY = re.compile(f"[!-~]{{1,{MAX_CREDENTIAL_BYTES}}}", re.ASCII)
# Per process: an instance's poll is written to the cache at most once a second.
_instances = live.GatewayInstances()


# tokens


def issue_gateway_token(name: str) -> tuple[GatewayToken, str]:
    """Create a gateway token; return it and its secret (shown once, stored as a digest)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ServiceError("a gateway token needs a name of 1 to 100 characters")
    secret = GATEWAY_TOKEN_PREFIX + token_secrets.token_urlsafe(32)
    with transaction.atomic():
        if GatewayToken.objects.filter(name=name, revoked_at__isnull=True).exists():
            raise ServiceError(f"a gateway token named {name!r} is in use: revoke it first", 409)
        token = GatewayToken.objects.create(name=name, token_hash=secrets.digest(secret),
                                            prefix=secret[:10])
    return token, secret


def revoke_gateway_tokens(name: str) -> int:
    """Revoke the tokens named `name`; return how many were in use."""
    return GatewayToken.objects.filter(name=name, revoked_at__isnull=True).update(
        revoked_at=timezone.now())


def authenticate_gateway(authorization: str) -> GatewayToken:
    """Return the valid token in an `Authorization: Bearer` header, or raise 401."""
    # bearer_secret refuses over-long values before anything looks them up.
    secret = secrets.bearer_secret(authorization)
    digest = secrets.digest(secret) if secret else ""
    token = (GatewayToken.objects.filter(token_hash=digest, revoked_at__isnull=True).first()
             if digest else None)
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        raise ServiceError("a valid gateway token is required (Authorization: Bearer swg_...)",
                           401)
    return token


# plumbing


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JsonResponse:
    return JsonResponse({"error": message}, status=status, headers=headers)


def _unavailable(what: str) -> JsonResponse:
    return _error(f"{what} is unavailable; retry shortly", 503,
                  {"Retry-After": str(RETRY_AFTER_S)})


def _gateway_view(method: str) -> Callable[[Callable[..., HttpResponse]], Any]:
    """Check the method and the gateway token; turn refusals and outages into JSON."""
    def decorate(handler: Callable[..., HttpResponse]) -> Any:
        @csrf_exempt
        def view(request: HttpRequest) -> HttpResponse:
            if request.method != method:
                return _error("method not allowed", 405, {"Allow": method})
            try:
                authenticate_gateway(request.headers.get("Authorization", ""))
                return handler(request)
            except ServiceError as exc:
                headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
                return _error(exc.message, exc.status_code, exc.headers or headers)
            except live.CacheUnavailable:
                return _unavailable("the cache")
            except DatabaseError:
                return _unavailable("the database")
        view.__name__ = handler.__name__
        return view
    return decorate


def _refuse_constant(name: str) -> Any:
    raise ServiceError(f"the body is not valid JSON: {name} is not a number")


def _json_object(request: HttpRequest, keys: set[str],
                 optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Return the JSON object body with exactly `keys` (and any of `optional`); raise
    ServiceError (4xx)."""
    content_type = request.content_type or ""
    if content_type != "application/json":
        raise ServiceError(f"the body must be application/json, not {content_type[:50]!r}", 415)
    try:
        body = request.body
    except RequestDataTooBig:
        raise ServiceError("the request body is too large", 413) from None
    if len(body) > MAX_BODY_BYTES:
        raise ServiceError("the request body is too large", 413)
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except ValueError as exc:  # not JSON, not UTF-8, or an integer past 4,300 digits
        raise ServiceError(f"the body is not valid JSON: {str(exc)[:100]}") from None
    except RecursionError:
        raise ServiceError("the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict) or not keys <= set(data) <= keys | optional:
        also = f" (and optionally {sorted(optional)})" if optional else ""
        raise ServiceError(f"the body must be a JSON object with exactly {sorted(keys)}{also}")
    return data


def _whole(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ServiceError(f"{what} must be an integer from {low} to {high}")
    return value


# views


def _instance(request: HttpRequest) -> str | None:
    unknown = set(request.GET) - {"instance", "tunnel"}
    if unknown:
        raise ServiceError(f"unknown query parameter {sorted(unknown)[0][:50]!r}")
    instance = request.GET.get("instance")
    if instance is not None and not _INSTANCE.fullmatch(instance):
        raise ServiceError("instance must be 1 to 64 characters of A-Z a-z 0-9 _ . : -")
    return instance


def _tunnel_url(request: HttpRequest) -> str | None:
    url = request.GET.get("tunnel")
    if url is not None and not reachability.valid_tunnel_url(url):
        raise ServiceError("tunnel must be a ws:// or wss:// URL of at most 200 characters")
    return url


def _revision() -> str:
    revision = live.routes_revision()
    if revision == "0":
        # The cache came back empty: a fresh revision makes every gateway reload, so a
        # "0" from before the loss can never match a different table.
        live.bump_routes()
        revision = live.routes_revision()
    return revision


@_gateway_view("GET")
def table(request: HttpRequest) -> HttpResponse:
    """The routing table, each cap split over the gateways that polled in the last 3 s."""
    instance = _instance(request)
    now_s = time.time()
    if instance is not None:
        _instances.note(instance, now_s)
        reachability.note_tunnel_url(instance, _tunnel_url(request), now_s)
    # Read before the build: a change during it shows as a new revision next poll.
    revision = _revision()
    gateways = max(1, _instances.count(now_s))
    tag = f"{revision}.{gateways}"
    etag = f'"{tag}"'
    headers = {"ETag": etag, "Cache-Control": "no-store"}
    if request.headers.get("If-None-Match") == etag:
        return HttpResponse(status=304, headers=headers)
    built = share_caps(route_table(tag), gateways)
    return JsonResponse(built.to_dict(), headers=headers)


@_gateway_view("POST")
def sessions(request: HttpRequest) -> HttpResponse:
    """Whether a portal session belongs to an active, logged-in user (the playground)."""
    session_key = _json_object(request, {"session_key"})["session_key"]
    if not isinstance(session_key, str) or not _SESSION_KEY.fullmatch(session_key):
        raise ServiceError(f"session_key must be 1 to {MAX_CREDENTIAL_BYTES} printable ASCII "
                           "characters")
    return JsonResponse({"allowed": session_user_active(session_key)})


@_gateway_view("POST")
def activations(request: HttpRequest) -> HttpResponse:
    """Ask the auto-scaler to start a replica of a deployment the gateway holds requests for."""
    body = _json_object(request, {"deployment_id", "held"})
    deployment_id = _whole(body["deployment_id"], "deployment_id", 1, 2**63 - 1)
    held = _whole(body["held"], "held", 0, MAX_HELD)
    try:
        activation.activate(deployment_id, held)
    except activation.NoActivator:
        return _unavailable("the auto-scaler")
    except (KombuError, OSError):
        return _unavailable("the task broker")
    return HttpResponse(status=202)


def _epoch_s(value: Any, replica_id: int) -> float:
    """Return a time in seconds since the epoch; raise ServiceError for anything else."""
    try:
        # An int of hundreds of digits parses as JSON but overflows a float.
        at_s = float(value) if type(value) in (int, float) else math.nan
    except OverflowError:
        at_s = math.nan
    if not math.isfinite(at_s) or at_s < 0:
        raise ServiceError(f"replica {replica_id}: a time is finite seconds since the epoch")
    return at_s


def _successes(raw: Any) -> dict[int, float]:
    if not isinstance(raw, dict) or len(raw) > MAX_SUCCESSES:
        raise ServiceError(f"replicas must be an object of at most {MAX_SUCCESSES} entries")
    parsed: dict[int, float] = {}
    for key, at_s in raw.items():
        replica_id = parse_count(key)
        if replica_id is None or replica_id == 0:
            raise ServiceError(f"replica ids are positive integers, not {key[:30]!r}")
        parsed[replica_id] = _epoch_s(at_s, replica_id)
    return parsed


def _keys_used(raw: Any) -> dict[int, float]:
    if not isinstance(raw, dict) or len(raw) > MAX_KEYS_USED:
        raise ServiceError(f"keys must be an object of at most {MAX_KEYS_USED} entries")
    parsed: dict[int, float] = {}
    for key, at_s in raw.items():
        key_id = parse_count(key)
        if key_id is None or key_id == 0:
            raise ServiceError(f"API key ids are positive integers, not {key[:30]!r}")
        try:
            parsed[key_id] = _epoch_s(at_s, key_id)
        except ServiceError:
            raise ServiceError(f"API key {key_id}: a time is finite seconds since the "
                               "epoch") from None
    return parsed


@_gateway_view("POST")
def successes(request: HttpRequest) -> HttpResponse:
    """Record when replicas last answered a gateway (the offline sweep's evidence) and,
    when sent, when API keys were last admitted (last_used_at, to the minute)."""
    body = _json_object(request, {"replicas"}, frozenset({"keys"}))
    replicas = _successes(body["replicas"])
    keys = _keys_used(body.get("keys", {}))
    live.record_replica_successes(replicas)
    record_keys_used(keys, time.time())
    return HttpResponse(status=204)


app_name = "gateway_api"
urlpatterns = [
    path("table", table, name="table"),
    path("sessions", sessions, name="sessions"),
    path("activations", activations, name="activations"),
    path("successes", successes, name="successes"),
]
