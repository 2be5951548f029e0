"""OpenAI-compatible endpoints at the gateway: `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions`, streamed or not, for the generative deployments in the table.

A /v1 request is admitted exactly as a /v2 one (core.py's `admit`: API key or portal
session, the key's deployments, request rate limit), once the body has said which
deployment (`model`; `name:N` pins version N). Then the key's token limit: a key whose
token bucket is spent gets 429 before anything is forwarded. The body goes unchanged to
the replica's same path through `infer` (canary draw, hold at zero, balancing, retries
elsewhere before the first byte), and the answer's `usage.total_tokens` is charged to
the key afterwards: read from the JSON answer, or from the stream's last usage event as
the stream passes (openai_wire.UsageScanner keeps that one event, nothing more).

Every refusal is OpenAI's error shape with the status the `openai` client maps to its
exceptions (400, 401, 403, 404, 413, 429, 503). Before any body is read, a request with
no credentials at all is refused, so an anonymous client costs one parse at most.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serving.affinity import prefix_key
from serving.gateway.auth import Rejected, credentials, key_digest, session_key
from serving.gateway.forwarding import UpstreamRequest
from serving.gateway.limits import shown
from serving.gateway.openai_wire import (
    STREAM_BYTES_PER_TOKEN,
    OpenAIRequestError,
    as_openai_error,
    generate_prompt,
    generative,
    model_list,
    openai_error,
    parse_generation_request,
    usage_tokens,
)
from serving.gateway.ratelimit import retry_after_s
from serving.gateway.requests import BodyTooLarge, ClientGone, read_body
from serving.gateway.responses import Headers, Receive, Response, retry_later
from serving.gateway.routes import ApiKeyRoute, DeploymentRoute
from serving.gateway.streaming import StreamingResponse, StreamSummary
from swarm_protocol.wire_numbers import parse_count

if TYPE_CHECKING:
    from serving.gateway.core import GatewayCore

V1_PREFIX = "/v1/"
MODELS_PATH = "/v1/models"
CHAT_PATH = "/v1/chat/completions"
# The replica serves the same paths (serving/replica/openai_http.py).
GENERATION_PATHS = {"/v1/completions": b"/v1/completions", CHAT_PATH: b"/v1/chat/completions"}
# The /v2 actions whose answers are charged in tokens too (generate's `usage`).
GENERATE_ACTIONS = frozenset({"generate", "generate_stream"})
_CHALLENGE: Headers = [(b"www-authenticate", b"Bearer")]


class OpenAIEndpoints:
    """The /v1 endpoints over a gateway core (the same table, keys, limits and balancers)."""

    def __init__(self, core: GatewayCore) -> None:
        self._core = core

    async def respond(self, method: str, path: str, headers: Headers,
                      body: bytes | BodyTooLarge | None,
                      receive: Receive | None) -> Response | StreamingResponse | None:
        """Return the answer to one /v1 request; None when the client left meanwhile.

        `body`: read by the transport already (BodyTooLarge: past max_body_bytes), or None
        to read it from `receive` once the caller has shown credentials.
        """
        if path == MODELS_PATH:
            if method not in ("GET", "HEAD"):
                return _method_not_allowed("GET")
            return await self._models(headers)
        upstream_path = GENERATION_PATHS.get(path)
        if upstream_path is None:
            return openai_error(404, f"no such endpoint: {shown(path)}", code="unknown_url")
        if method != "POST":
            return _method_not_allowed("POST")
        return await self._generate(upstream_path, path == CHAT_PATH, headers, body, receive)

    # GET /v1/models

    async def _models(self, headers: Headers) -> Response:
        """Return the generative deployments the caller may use (401 for no caller)."""
        core = self._core
        if not core.ready:
            return openai_error(503, "the gateway has no routing table yet",
                                headers=[(b"retry-after", b"1")])
        names = [name for name, runtime in core.fleet.deployments.items()
                 if generative(runtime.route)]
        allowed = []
        # Asked per deployment, as a request would be: a key scoped to some deployments
        # sees those; a session is asked (and cached) per deployment of the table only.
        for name in names or [""]:
            try:
                await core.authorize(headers, name, bool(name))
            except Rejected as rejected:
                if rejected.response.status == 403:
                    continue  # a valid key that may not use this one
                return as_openai_error(rejected.response)
            if name:
                allowed.append(name)
        return model_list(allowed)

    # POST /v1/completions, /v1/chat/completions

    async def _generate(self, upstream_path: bytes, chat: bool, headers: Headers,
                        body: bytes | BodyTooLarge | None,
                        receive: Receive | None) -> Response | StreamingResponse | None:
        core = self._core
        if not core.ready:
            return openai_error(503, "the gateway has no routing table yet",
                                headers=[(b"retry-after", b"1")])
        anonymous = _anonymous(headers)
        if anonymous is not None:
            return anonymous
        started_s = core.now_s()
        read = await self._read_body(headers, body, receive)
        if not isinstance(read, bytes):
            return read
        try:
            request = parse_generation_request(read, chat)
        except OpenAIRequestError as malformed:
            return malformed.response
        target = request.target
        runtime = await core.admit(target, headers)
        if isinstance(runtime, Response):
            return as_openai_error(runtime)
        if not generative(runtime.route, target.version):
            return openai_error(404, f"the model {target.name!r} does not generate text",
                                param="model")
        key = self._key(headers)
        spent = self._tokens_refusal(key, runtime.name, oip=False)
        if spent is not None:
            return spent
        forwarded: Headers = [(b"content-type", b"application/json")]
        upstream = UpstreamRequest(b"POST", upstream_path, forwarded, read,
                                   _affinity(runtime.route, request.prompt))
        response = await core.infer(runtime, target, upstream, started_s, receive,
                                    stream=request.stream)
        if response is None:
            return None
        if isinstance(response, Response):
            response = as_openai_error(response)
        return self._charged(response, key)

    async def _read_body(self, headers: Headers, body: bytes | BodyTooLarge | None,
                         receive: Receive | None) -> bytes | Response | None:
        """Return the whole body, the 400/413 answer, or None when the client left."""
        limit_bytes = self._core.max_body_bytes
        too_large = openai_error(413, f"the request body is larger than {limit_bytes} bytes")
        if isinstance(body, BodyTooLarge):
            return too_large
        if body is not None:
            return body
        declared = dict(headers).get(b"content-length")
        if declared is not None and parse_count(declared, limit_bytes) is None:
            return too_large if declared.isdigit() else openai_error(
                400, "Content-Length must be a non-negative integer")
        assert receive is not None, "no body and nothing to read it from"
        try:
            read = await read_body(receive, limit_bytes)
        except ClientGone:
            return None
        return too_large if read is None else read

    def _key(self, headers: Headers) -> ApiKeyRoute | None:
        """Return the admitted caller's API key (None: a portal session)."""
        authorization = next((value for name, value in headers if name == b"authorization"),
                             None)
        if authorization is None:
            return None
        try:
            return self._core.table.api_keys.get(key_digest(authorization))
        except Rejected:  # cannot happen once admitted; a session is charged nothing
            return None

    # /v2 generate and generate_stream: the same limit and charge (app.py calls these)

    def tokens_refusal(self, headers: Headers, deployment: str, oip: bool) -> Response | None:
        """Return the 429 for an admitted caller whose token bucket is spent, else None;
        `oip`: in the /v2 error shape."""
        return self._tokens_refusal(self._key(headers), deployment, oip)

    def generate_affinity(self, route: DeploymentRoute, body: bytes) -> bytes | None:
        """Return the prefix key of a generate body's prompt when the deployment asks for
        prefix affinity (the body is parsed only then), else None."""
        if route.prefix_affinity_chars <= 0:
            return None
        return _affinity(route, generate_prompt(body))

    def charge(self, headers: Headers, response: Response | StreamingResponse | None,
               ) -> Response | StreamingResponse | None:
        """Charge an admitted caller for an answer's tokens (see `_charged`)."""
        return None if response is None else self._charged(response, self._key(headers))

    def _tokens_refusal(self, key: ApiKeyRoute | None, deployment: str,
                        oip: bool) -> Response | None:
        """Return the 429 for a key whose token bucket is spent, else None."""
        if key is None or key.tokens_per_minute is None:
            return None
        wait_s = self._core.token_wait_s(key)
        if wait_s <= 0:
            return None
        self._core.metrics.rejected(deployment, 429)
        message = "token rate limit exceeded for this API key"
        retry_s = retry_after_s(wait_s)
        if oip:
            return retry_later(429, message, retry_s)
        return openai_error(429, message, error_type="tokens",
                            headers=[(b"retry-after", str(retry_s).encode())])

    def _charged(self, response: Response | StreamingResponse,
                 key: ApiKeyRoute | None) -> Response | StreamingResponse:
        """Charge the answer's tokens to the key: now for a whole answer, when it ends for
        a stream (from its last event, the usage one, which the stream keeps)."""
        if key is None or key.tokens_per_minute is None or response.status != 200:
            return response
        core = self._core
        if isinstance(response, Response):
            tokens = usage_tokens(response.body)
            if tokens is not None:
                core.charge_tokens(key, tokens)
            return response

        def charge(summary: StreamSummary) -> None:
            tokens = usage_tokens(summary.last_event)
            # A stream cut short has no usage event: its size is the best count there is.
            core.charge_tokens(key, summary.body_bytes // STREAM_BYTES_PER_TOKEN
                               if tokens is None else tokens)

        response.on_end.append(charge)
        return response


def _affinity(route: DeploymentRoute, prompt: str) -> bytes | None:
    """Return the prompt's prefix key when the deployment asks for prefix affinity."""
    chars = route.prefix_affinity_chars
    return prefix_key(prompt, chars) if chars > 0 and prompt else None


def _anonymous(headers: Headers) -> Response | None:
    """Return the 401 (or 431) for a request without any credentials, else None."""
    try:
        authorization, cookie = credentials(headers)
    except Rejected as rejected:
        return as_openai_error(rejected.response)
    if authorization is None and (cookie is None or session_key(cookie) is None):
        return openai_error(401, "missing API key: send 'Authorization: Bearer <API key>'",
                            headers=_CHALLENGE)
    return None


def _method_not_allowed(allowed: str) -> Response:
    return openai_error(405, f"use {allowed} here", headers=[(b"allow", allowed.encode())])
