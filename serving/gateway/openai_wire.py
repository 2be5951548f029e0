"""OpenAI's wire shapes at the gateway (pure: no I/O): errors, the request's `model`, the
model list, and the `usage` of an answer, whole or streamed.

The gateway reads only what it routes and charges by: the body's `model` (which
deployment, `name:N` pins version N), its prompt (for prefix affinity) and the answer's
`usage.total_tokens`. Everything else goes to the replica unchanged; the replica
validates the sampling fields and answers its own 400s in this same error shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from serving.gateway.requests import MAX_VERSION, UNKNOWN_VERSION, ModelPath
from serving.gateway.responses import JSON_HEADERS, Headers, Response
from serving.gateway.routes import DeploymentRoute
from swarm_protocol.wire_numbers import parse_count

# Platforms (VersionInfo.platform) that generate text: registry.models.PLATFORMS.
GENERATIVE_PLATFORMS = frozenset({"transformers_causal_lm"})
OWNED_BY = "swarm-portal"
# A stream cut short (the client left) has no usage event; it is charged its size over
# this. Measured on our replica: 178-185 bytes of stream per generated token (chat and
# completions, 40 tokens), so a cut stream is charged a little more than it cost, not less.
STREAM_BYTES_PER_TOKEN = 150
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 414: "invalid_request_error",
          431: "invalid_request_error", 429: "requests"}
_CODES = {401: "invalid_api_key", 403: "model_not_allowed", 404: "model_not_found",
          413: "request_too_large", 429: "rate_limit_exceeded"}


class OpenAIRequestError(Exception):
    """A request the gateway refuses before routing it; `response` is the 400 answer."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.response = openai_error(400, message, param=param)


def openai_error(status: int, message: str, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None,
                 headers: Headers | None = None) -> Response:
    """Return an error in OpenAI's shape: {"error": {message, type, param, code}}."""
    body = {"error": {"message": message,
                      "type": error_type or _TYPES.get(status, "server_error"),
                      "param": param, "code": code or _CODES.get(status)}}
    encoded = json.dumps(body, separators=(",", ":")).encode()
    return Response(status, encoded, [*JSON_HEADERS, *(headers or [])])


def as_openai_error(response: Response) -> Response:
    """Return a gateway answer with an OIP error body ({"error": "text"}) in OpenAI's
    shape, keeping status and headers; any other answer (a replica's) is returned as is."""
    if response.status < 400 or not response.body.startswith(b'{"error":"'):
        return response
    try:
        message = json.loads(response.body)["error"]
    except (ValueError, KeyError, TypeError):
        return response
    extra = [h for h in response.headers if h[0] != b"content-type"]
    return openai_error(response.status, str(message), headers=extra)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What the gateway reads of a /v1 body: the target and the prompt text."""

    target: ModelPath
    prompt: str  # the prompt, or the chat's messages' text joined (for prefix affinity)
    stream: bool  # the client asked for Server-Sent Events


def parse_generation_request(body: bytes, chat: bool) -> GenerationRequest:
    """Return the model and prompt of a completions (chat: chat completions) body; raise
    OpenAIRequestError (400) when it is not a JSON object with a string `model`."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OpenAIRequestError(f"the body is not JSON: {exc}") from None
    except RecursionError:  # json.loads recurses per nesting level
        raise OpenAIRequestError("the body's JSON is nested too deeply") from None
    if not isinstance(request, dict):
        raise OpenAIRequestError("the body must be a JSON object")
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIRequestError("'model' must be a non-empty string", "model")
    prompt = chat_text(request.get("messages")) if chat else prompt_text(request.get("prompt"))
    return GenerationRequest(model_target(model), prompt, request.get("stream") is True)


def model_target(model: str) -> ModelPath:
    """Return the inference target a `model` names: `name`, or `name:N` for version N."""
    name, colon, version_text = model.partition(":")
    if not colon:
        return ModelPath(model, None, "", "infer")
    parsed = parse_count(version_text, MAX_VERSION)
    # Canonical spelling only, as in /versions/N: `tiny:07` names no version.
    version = parsed if parsed is not None and str(parsed) == version_text else UNKNOWN_VERSION
    return ModelPath(name, version, version_text, "infer")


def prompt_text(prompt: Any) -> str:
    """Return a completions prompt's text (the first of a list); "" when it has none."""
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else ""


def generate_prompt(body: bytes) -> str:
    """Return a /v2 generate body's `text_input` ("" when it has none or is not JSON)."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ""
    prompt = request.get("text_input") if isinstance(request, dict) else None
    return prompt_text(prompt)


def chat_text(messages: Any) -> str:
    """Return the chat's messages as one text, in order (roles and string contents)."""
    if not isinstance(messages, list):
        return ""
    parts = []
    for message in messages:
        if isinstance(message, dict):
            content = message.get("content")
            parts.append(f"{message.get('role')}\n{content if isinstance(content, str) else ''}")
    return "\n".join(parts)


def generative(route: DeploymentRoute, version: int | None = None) -> bool:
    """Return whether the deployment (pinned: that version) generates text."""
    if version is not None:
        info = route.versions.get(version)
        return info is not None and info.platform in GENERATIVE_PLATFORMS
    served = [v for v, weight in route.weights.items() if weight > 0] or list(route.versions)
    return any(route.versions[v].platform in GENERATIVE_PLATFORMS
               for v in served if v in route.versions)


def model_list(names: Iterable[str]) -> Response:
    """Return GET /v1/models's answer for these deployment names."""
    # The table has no creation times: 0 says "unknown" in the field's own type.
    data = [{"id": name, "object": "model", "created": 0, "owned_by": OWNED_BY}
            for name in sorted(names)]
    body = json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()
    return Response(200, body, JSON_HEADERS)


def usage_tokens(answer: bytes) -> int | None:
    """Return `usage.total_tokens` of a JSON answer (or of one SSE event's data), or None."""
    try:
        usage = json.loads(answer).get("usage")
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
    except (UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return None
    return total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 \
        else None
