"""The replica's plain ASGI application: auth, routing, and one handler per OIP endpoint.

No framework: a dict lookup on the path finds the handler, every response is JSON (or an
OIP binary body), and nothing here redirects or renders HTML.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from serving.replica import codec
from serving.replica.codec import CodecError, OutputTensor
from serving.replica.config import ReplicaConfig
from serving.replica.engine import InferenceEngine
from serving.replica.pipeline import InputRejected
from serving.replica.prometheus_metrics import CONTENT_TYPE, ReplicaMetrics
from serving.replica.runner import ModelFailure
from swarm_protocol.wire_numbers import parse_count

SERVER_NAME = "swarm-replica"
SERVER_VERSION = "0.1.0"
PLATFORMS = {"torchscript": "pytorch_torchscript", "torch_export": "pytorch_torch_export",
             "onnx": "onnxruntime_onnx", "hf_causal_lm": "transformers_causal_lm"}
RETRY_AFTER_S = b"1"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
logger = logging.getLogger("serving.replica")

_JSON: Headers = [(b"content-type", b"application/json")]
_RETRY: Headers = [*_JSON, (b"retry-after", RETRY_AFTER_S)]


@dataclass(frozen=True)
class Response:
    """Status, body and headers of one answer."""

    status: int
    body: bytes
    headers: Headers


def json_response(status: int, value: Any, headers: Headers = _JSON) -> Response:
    """Return a JSON response."""
    return Response(status, codec.dump_json(value), headers)


def error_response(status: int, message: str, headers: Headers = _JSON) -> Response:
    """Return an OIP error response {"error": message}."""
    return Response(status, codec.error_body(message), headers)


def error_for(path: str, status: int, message: str, headers: Headers = _JSON) -> Response:
    """Return an error in the shape of the path's protocol: OpenAI's nested
    {"error": {"message", "type", "param", "code"}} under /v1/, else OIP's."""
    if not path.startswith("/v1/"):
        return error_response(status, message, headers)
    from serving.replica.openai_request import error_body

    error_type = "server_error" if status >= 500 else "invalid_request_error"
    return json_response(status, error_body(message, error_type), headers)


# A handler that sent its own answer (a stream) returns this; nothing more is sent.
STREAMED = Response(0, b"", [])
SEND_SCOPE_KEY = "swarm.send"  # the ASGI send of the request, for streaming handlers


class ClientError(Exception):
    """A request refused before it reaches the codec (status and message for the client)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[[Scope, Receive, dict[bytes, bytes]], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    handler: Handler
    counts_in_flight: bool = False


class ReplicaApp:
    """ASGI callable serving one model version."""

    def __init__(self, config: ReplicaConfig, engine: InferenceEngine) -> None:
        self.config = config
        self.engine = engine
        self.state = "loading"
        self.in_flight = 0
        # Request-seconds served so far (the integral of in_flight over time): pollers take
        # differences to get the mean concurrency over their interval (Little's law), which
        # an instantaneous in_flight sampled once a second misses at low load.
        self._in_flight_s = 0.0
        self._in_flight_since_s = time.monotonic()
        self._idle: asyncio.Event | None = None
        self._bearer = b"Bearer " + config.key.encode()
        self._version = str(config.model_version)
        self.generation = generation_backend_of(engine.runner)
        self.metrics = self._build_metrics()
        self._routes = self._build_routes()
        # What clients see: the engine's runner serves the signature after any steps.
        self.signature = engine.runner.signature
        self._metadata = codec.dump_json({
            "name": config.model_name, "versions": [self._version],
            "platform": PLATFORMS[config.artifact_format],
            **self.signature.to_dict(),
        })

    def _build_routes(self) -> dict[str, Route]:
        routes = {
            "/v2/health/live": Route("GET", self._live),
            "/v2/health/ready": Route("GET", self._ready),
            "/v2": Route("GET", self._server_metadata),
            "/v2/": Route("GET", self._server_metadata),
            "/stats": Route("GET", self._stats),
            "/metrics": Route("GET", self._metrics_text),
        }
        if self.generation is not None:
            routes["/v1/models"] = Route("GET", self._openai_models)
            routes["/v1/completions"] = Route("POST", self._openai_completions, True)
            routes["/v1/chat/completions"] = Route("POST", self._openai_chat, True)
        name = self.config.model_name
        for base in (f"/v2/models/{name}", f"/v2/models/{name}/versions/{self._version}"):
            routes[base] = Route("GET", self._model_metadata)
            routes[f"{base}/ready"] = Route("GET", self._model_ready)
            routes[f"{base}/infer"] = Route("POST", self._infer, counts_in_flight=True)
            if self.generation is not None:
                routes[f"{base}/generate"] = Route("POST", self._generate, True)
                routes[f"{base}/generate_stream"] = Route("POST", self._generate_stream, True)
        return routes

    def _build_metrics(self) -> ReplicaMetrics:
        # The replica label is host:port (what an operator sees in the fleet page); the
        # labels are fixed now, so the series never grow.
        replica = f"{socket.gethostname()}:{self.config.port}"
        metrics = ReplicaMetrics(self.config.model_name, self._version, replica)
        metrics.watch_in_flight(lambda: float(self.in_flight))
        if self.generation is not None:  # before load(): the engine takes its observers then
            self.generation.observers.append(
                metrics.generation_observer(self.generation.counts))
        return metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        path = scope["path"]
        route = self._routes.get(path)
        if not hmac.compare_digest(headers.get(b"authorization", b""), self._bearer):
            response = error_for(path, 401, "missing or wrong bearer token",
                                 [*_JSON, (b"www-authenticate", b"Bearer")])
        elif route is None:
            response = error_for(path, 404, self._not_found_message(path))
        elif route.method != scope["method"]:
            response = error_for(path, 405, f"use {route.method} here",
                                 [*_JSON, (b"allow", route.method.encode())])
        elif route.counts_in_flight:
            await self._send_counted(route, scope, receive, send, headers)
            return
        else:
            response = await self._handle(route, scope, receive, headers)
        await _send(send, response)

    async def _send_counted(self, route: Route, scope: Scope, receive: Receive, send: Send,
                            headers: dict[bytes, bytes]) -> None:
        if self.state != "ready":
            await _send(send, error_for(scope["path"], 503, f"replica is {self.state}",
                                        _RETRY))
            return
        self._account_in_flight(time.monotonic())
        self.in_flight += 1
        try:
            response = await self._handle(route, {**scope, SEND_SCOPE_KEY: send}, receive,
                                          headers)
            if response is not STREAMED:
                await _send(send, response)
        finally:
            self._account_in_flight(time.monotonic())
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    def _account_in_flight(self, now_s: float) -> None:
        self._in_flight_s += self.in_flight * (now_s - self._in_flight_since_s)
        self._in_flight_since_s = now_s

    async def _handle(self, route: Route, scope: Scope, receive: Receive,
                      headers: dict[bytes, bytes]) -> Response:
        try:
            return await route.handler(scope, receive, headers)
        except ClientError as exc:
            return error_for(scope["path"], exc.status, str(exc))
        except CodecError as exc:
            return error_response(400, str(exc))
        except Exception:
            logger.exception("internal error on %s %s", scope["method"], scope["path"])
            return error_for(scope["path"], 500, "internal error in the replica server")

    def _not_found_message(self, path: str) -> str:
        parts = path.split("/")
        if path.startswith("/v2/models/") and len(parts) > 3:
            if parts[3] != self.config.model_name:
                return f"unknown model {parts[3]!r}; this replica serves " \
                       f"{self.config.model_name!r}"
            if len(parts) > 5 and parts[4] == "versions" and parts[5] != self._version:
                return f"unknown version {parts[5]!r} of model {parts[3]!r}; this replica " \
                       f"serves version {self._version}"
        return f"no such endpoint: {path}"

    async def wait_idle(self) -> None:
        """Return once no inference request is in flight."""
        self._idle = asyncio.Event()
        if self.in_flight:
            await self._idle.wait()

    async def _live(self, *_: Any) -> Response:
        return json_response(200, {"live": True})

    async def _ready(self, *_: Any) -> Response:
        if self.state == "ready":
            return json_response(200, {"ready": True})
        return json_response(503, {"ready": False, "state": self.state}, _RETRY)

    async def _server_metadata(self, *_: Any) -> Response:
        return json_response(200, {"name": SERVER_NAME, "version": SERVER_VERSION,
                                   "extensions": ["binary_tensor_data"]})

    async def _model_metadata(self, *_: Any) -> Response:
        return Response(200, self._metadata, _JSON)

    async def _model_ready(self, *_: Any) -> Response:
        ready = self.state == "ready"
        return json_response(200 if ready else 503,
                             {"name": self.config.model_name, "ready": ready},
                             _JSON if ready else _RETRY)

    async def _stats(self, *_: Any) -> Response:
        now_s = time.monotonic()
        self._account_in_flight(now_s)
        snapshot = self.engine.stats.snapshot(now_s, self.state, self.in_flight,
                                              self.engine.queue_depth)
        snapshot.update(in_flight_seconds=round(self._in_flight_s, 6), clock_s=now_s)
        if self.generation is not None and self.generation.engine is not None:
            snapshot["generation"] = self.generation.engine.snapshot()
        return json_response(200, snapshot)

    async def _metrics_text(self, *_: Any) -> Response:
        return Response(200, self.metrics.render(), [(b"content-type", CONTENT_TYPE.encode())])

    async def _openai_models(self, *_: Any) -> Response:
        return json_response(200, {"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": 0,
            "owned_by": "swarm-portal"}]})

    async def _openai_completions(self, scope: Scope, receive: Receive,
                                  headers: dict[bytes, bytes]) -> Response:
        return await self._openai(scope, receive, headers, chat=False)

    async def _openai_chat(self, scope: Scope, receive: Receive,
                           headers: dict[bytes, bytes]) -> Response:
        return await self._openai(scope, receive, headers, chat=True)

    async def _openai(self, scope: Scope, receive: Receive, headers: dict[bytes, bytes],
                      chat: bool) -> Response:
        from serving.replica.openai_http import serve_openai

        assert self.generation is not None
        body = await self._read_body(receive, headers)  # a ClientError: error_for's shape
        answer = await serve_openai(self.generation, body, chat, receive,
                                    scope[SEND_SCOPE_KEY])
        return STREAMED if answer is None else json_response(*answer)

    def _identity(self) -> dict[str, str]:
        return {"model_name": self.config.model_name, "model_version": self._version}

    async def _generation(self, receive: Receive, headers: dict[bytes, bytes]) -> Any:
        from serving.replica.generation_http import start_generation
        from serving.replica.generation_text import GenerateInputError

        assert self.generation is not None
        body = await self._read_body(receive, headers)
        try:
            return start_generation(self.generation, body)
        except GenerateInputError as exc:
            raise ClientError(400, str(exc)) from None

    async def _generate(self, scope: Scope, receive: Receive,
                        headers: dict[bytes, bytes]) -> Response:
        from serving.replica.generation_http import generate_whole

        generation = await self._generation(receive, headers)
        status, body = await generate_whole(generation, self._identity(), receive)
        return json_response(status, body)

    async def _generate_stream(self, scope: Scope, receive: Receive,
                               headers: dict[bytes, bytes]) -> Response:
        from serving.replica.generation_http import generate_stream

        generation = await self._generation(receive, headers)
        refused = await generate_stream(generation, self._identity(), receive,
                                        scope[SEND_SCOPE_KEY])
        return STREAMED if refused is None else json_response(*refused)

    async def _infer(self, scope: Scope, receive: Receive,
                     headers: dict[bytes, bytes]) -> Response:
        started_s = time.monotonic()
        body = await self._read_body(receive, headers)
        json_length = codec.parse_header_length(
            headers.get(codec.HEADER_LENGTH_HEADER.encode()), len(body))
        request = codec.decode_infer_request(body, json_length)
        bound = codec.bind_to_signature(request, self.signature)
        try:
            outputs = await self.engine.infer(bound.arrays, bound.rows)
        except InputRejected as exc:
            return error_response(400, str(exc))
        except ModelFailure as exc:
            self.engine.stats.record_failure()
            logger.error("inference failed: %s", exc)
            return error_response(500, f"inference failed: {exc}")
        specs = self.signature.outputs
        encoded = codec.encode_infer_response(
            self.config.model_name, self._version, request.request_id,
            [OutputTensor(specs[i].name, specs[i].datatype, outputs[i], binary)
             for i, binary in bound.outputs])
        response_headers: Headers = [(b"content-type", encoded.content_type.encode())]
        if encoded.json_length is not None:
            response_headers.append((codec.HEADER_LENGTH_HEADER.encode(),
                                     str(encoded.json_length).encode()))
        finished_s = time.monotonic()
        self.engine.stats.record_success(finished_s, (finished_s - started_s) * 1000.0)
        return Response(200, encoded.body, response_headers)

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding != b"identity":
            raise ClientError(400, f"Content-Encoding {encoding.decode('latin-1')!r} is not "
                                   "supported")
        limit_bytes = self.config.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and parse_count(declared, limit_bytes) is None:
            if not declared.isdigit():
                raise ClientError(400, "Content-Length must be a non-negative integer")
            raise ClientError(413, f"the body is larger than {limit_bytes} bytes")
        chunks: list[bytes] = []
        size_bytes = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientError(400, "the client went away")
            chunk = message.get("body", b"")
            size_bytes += len(chunk)
            if size_bytes > limit_bytes:
                raise ClientError(413, f"the body is larger than {limit_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def generation_backend_of(runner: Any) -> Any:
    """Return the runner's GenerationBackend (hf_causal_lm versions), else None."""
    from serving.replica.generation_runner import GenerationBackend

    backend = getattr(runner, "backend", None)
    return backend if isinstance(backend, GenerationBackend) else None


async def _send(send: Send, response: Response) -> None:
    headers = [*response.headers, (b"content-length", str(len(response.body)).encode())]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
