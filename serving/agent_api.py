"""The agent API: register, heartbeat, deregister, artifact download.

Plain Django views, not DRF: a thousand nodes heartbeat every second, so this path
stays lean. Bodies are validated by the shared dataclasses in swarm_protocol.agent_messages.
Every answer is JSON: bad input is a 4xx naming the problem, a cache outage a 503 with
Retry-After (the agent retries), never an HTML error page.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from registry.downloads import SHA256_HEADER, read_chunks
from registry.models import ModelVersion
from registry.services import artifact_store
from serving import replica_logs, services
from serving.services import reachability
from swarm_portal.errors import ServiceError
from swarm_protocol.agent_messages import HeartbeatRequest, ProtocolError, RegisterRequest

MAX_AGENT_BODY_BYTES = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JsonResponse:
    return JsonResponse({"error": message}, status=status, headers=headers)


def _json_body(request: HttpRequest) -> Any:
    content_type = request.content_type or ""
    if content_type != "application/json":
        raise ServiceError(f"the body must be application/json, not {content_type[:50]!r}",
                           415)
    try:
        body = request.body
    except RequestDataTooBig:
        raise ServiceError("the request body is too large", 413) from None
    if len(body) > MAX_AGENT_BODY_BYTES:
        raise ServiceError("the request body is too large", 413)
    try:
        return json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServiceError(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ServiceError("the body is not valid JSON: nested too deeply") from None


def _agent_view(handler: Any) -> Any:
    """Turn ServiceError and ProtocolError into 4xx JSON for one agent endpoint."""
    @csrf_exempt
    def view(request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return _error("method not allowed", 405, {"Allow": "POST"})
        try:
            return handler(request)
        except ProtocolError as exc:
            return _error(f"malformed message: {exc}", 400)
        except ServiceError as exc:
            return _error(exc.message, exc.status_code, exc.headers)
    view.__name__ = handler.__name__
    return view


@_agent_view
def register(request: HttpRequest) -> HttpResponse:
    message = RegisterRequest.from_dict(_json_body(request))
    try:  # before the join's transaction: the probe may take PROBE_TIMEOUT_S
        mode = reachability.reach_mode(message, timezone.now())
    except reachability.Unusable as exc:
        return _error(str(exc), 401)
    response = services.do_register_node(message, reach_mode=mode)
    return JsonResponse(reachability.joined(response, mode).to_dict(), status=201)


@_agent_view
def heartbeat(request: HttpRequest) -> HttpResponse:
    node = services.authenticate_node(request.headers.get("Authorization", ""))
    message = HeartbeatRequest.from_dict(_json_body(request))
    lines = _take_log_lines(message)
    reply = reachability.with_tunnel(node, services.do_heartbeat(node, message))
    replica_logs.record_agent_lines(node.pk, lines, time.time())
    return JsonResponse(reply.to_dict())


def _take_log_lines(message: HeartbeatRequest) -> dict[int, list[str]]:
    """Return {replica id: its new output lines}, emptied from the message.

    The lines go to their own rings, not into the heartbeat figures that every node
    list and dashboard reads.
    """
    lines: dict[int, list[str]] = {}
    for status in message.replicas:
        if status.log_lines:
            lines.setdefault(status.replica_id, []).extend(status.log_lines)
            status.log_lines = []
    return lines


@_agent_view
def deregister(request: HttpRequest) -> HttpResponse:
    node = services.authenticate_node(request.headers.get("Authorization", ""))
    services.do_deregister_node(node)
    return HttpResponse(status=204)


async def artifact(request: HttpRequest, sha256: str) -> HttpResponse:
    """Stream an artifact to a node (async: multi-GB files never sit in memory)."""
    if request.method != "GET":
        return _error("method not allowed", 405, {"Allow": "GET"})
    try:
        await sync_to_async(services.authenticate_node)(request.headers.get("Authorization", ""))
    except ServiceError as exc:
        return _error(exc.message, exc.status_code, exc.headers)
    if not _SHA256.fullmatch(sha256):
        return _error("an artifact is named by its sha256: 64 lowercase hex digits", 404)
    version = await ModelVersion.objects.filter(sha256=sha256).afirst()
    if version is None:
        return _error(f"no artifact with sha256 {sha256}", 404)
    path = artifact_store().path(version.artifact_name)
    response = StreamingHttpResponse(read_chunks(str(path)),
                                     content_type="application/octet-stream")
    response[SHA256_HEADER] = version.sha256
    response["Content-Length"] = str(version.size_bytes)
    return response
