"""The Open Inference Protocol over gRPC (KServe's `inference.GRPCInferenceService`).

A thin transport on grpcio's asyncio server: each RPC becomes the same `admit` and
`infer` calls the REST path makes on the GatewayApp (keys, rate limits, balancing,
retries, hold at zero, metrics), with the API key in the `authorization` metadata
(`Bearer <key>`), and each refusal becomes a gRPC status (grpc_codec.GRPC_CODES) whose
details are the gateway's or the replica's error message. Messages larger than the
gateway's body limit are refused by grpcio itself (RESOURCE_EXHAUSTED) before any of this.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import quote

import grpc

from serving.gateway.app import GatewayApp
from serving.gateway.deployments import DeploymentRuntime
from serving.gateway.forwarding import UpstreamRequest
from serving.gateway.grpc_codec import (
    GrpcCodecError,
    error_details,
    grpc_code,
    grpc_response,
    rest_request,
)
from serving.gateway.proto import grpc_predict_v2_pb2 as pb
from serving.gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.gateway.requests import ModelPath
from serving.gateway.responses import Headers, Response, error
from swarm_protocol.wire_numbers import parse_count

BINARY_CONTENT_TYPE = (b"content-type", b"application/octet-stream")
HEADER_LENGTH = b"inference-header-content-length"
# Metadata the core reads: the caller's credentials. Nothing else is looked at.
CREDENTIAL_KEYS = frozenset({"authorization", "cookie"})
GRACE_S = 5.0  # a stopping server lets RPCs in progress finish this long
logger = logging.getLogger("serving.gateway.grpc")


class _Aborted(Exception):
    """An RPC that ends with a gRPC status rather than a message."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over a GatewayApp's transport-neutral core."""

    def __init__(self, app: GatewayApp) -> None:
        self._app = app

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        await self._started()
        return pb.ServerReadyResponse(ready=self._app.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        metadata = json.loads(self._app.server_metadata.body)
        return pb.ServerMetadataResponse(name=metadata["name"], version=metadata["version"],
                                         extensions=metadata["extensions"])

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        admitted = await self._admit(request.name, request.version, "ready", context)
        if admitted.status in (200, 404, 503):  # Triton's answer: not ready, not an error
            return pb.ModelReadyResponse(ready=admitted.status == 200)
        await _abort(context, admitted)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        admitted = await self._admit(request.name, request.version, "", context)
        if admitted.status != 200:
            await _abort(context, admitted)
        metadata = json.loads(admitted.body)
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"],
            platform=metadata["platform"], inputs=_tensors(metadata["inputs"]),
            outputs=_tensors(metadata["outputs"]))

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        started_s = self._app.now_s()
        target = await self._target(request.model_name, request.model_version, "infer")
        admitted = await self._app_admit(target, context)
        if isinstance(admitted, Response):
            await _abort(context, admitted)
        assert target is not None  # only a parsed target admits a deployment
        try:
            body, json_length = rest_request(request)
        except GrpcCodecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        upstream = UpstreamRequest(b"POST", _upstream_path(target), [
            BINARY_CONTENT_TYPE, (HEADER_LENGTH, str(json_length).encode())], body)
        try:
            response = await self._app.infer(admitted, target, upstream, started_s)
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            self._app.metrics.cancelled(admitted.name)
            raise
        if response is None or response.status != 200:
            await _abort(context, response or Response(499, b"", []))
        try:
            return _infer_response(response)
        except (ValueError, KeyError, TypeError):  # JSON, shape or size errors
            logger.exception("replica answer for %r is not a binary OIP response",
                             admitted.name)
            await context.abort(grpc.StatusCode.INTERNAL,
                                "the replica's answer is not a valid inference response")
            raise AssertionError("unreachable: abort raises") from None

    # helpers

    async def _started(self) -> None:
        if not self._app.ready:
            await self._app.start()

    async def _target(self, name: str, version: str, action: str) -> ModelPath | None:
        """Return the parsed model and version (None: no such model can exist)."""
        await self._started()
        if not name or "/" in name or "/" in version:
            return None  # as a path these would name another endpoint
        path = f"/v2/models/{name}/versions/{version}" if version else f"/v2/models/{name}"
        return self._app.model_target(f"{path}/{action}" if action else path)

    async def _app_admit(self, target: ModelPath | None, context: grpc.aio.ServicerContext,
                         ) -> Response | DeploymentRuntime:
        if target is None:
            return error(404, "unknown model: a model name is one path segment")
        return await self._app.admit(target, _credentials(context.invocation_metadata()))

    async def _admit(self, name: str, version: str, action: str,
                     context: grpc.aio.ServicerContext) -> Response:
        """Return the core's answer to a metadata or readiness request."""
        admitted = await self._app_admit(await self._target(name, version, action), context)
        if not isinstance(admitted, Response):  # only inference targets admit a runtime
            raise AssertionError(f"{action!r} admitted to {admitted.name!r}")
        return admitted


def _credentials(metadata: Sequence[tuple[str, str | bytes]] | None) -> Headers:
    """Return the credential metadata as the header pairs the core reads."""
    headers: Headers = []
    for key, value in metadata or ():
        if key in CREDENTIAL_KEYS and isinstance(value, str):
            headers.append((key.encode(), value.encode()))
    return headers


def _upstream_path(target: ModelPath) -> bytes:
    """Return the replica's REST path for an inference target."""
    name = quote(target.name, safe="")
    if target.version is None:
        return f"/v2/models/{name}/infer".encode()
    return f"/v2/models/{name}/versions/{target.version}/infer".encode()


def _infer_response(response: Response) -> pb.ModelInferResponse:
    """Return the gRPC message for the replica's binary 200 answer."""
    headers = dict(response.headers)
    declared = headers.get(HEADER_LENGTH)
    json_length = parse_count(declared, len(response.body)) if declared is not None else None
    return grpc_response(response.body, json_length)


def _tensors(specs: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(
        name=spec["name"], datatype=spec["datatype"], shape=spec["shape"]) for spec in specs]


async def _abort(context: grpc.aio.ServicerContext, response: Response) -> NoReturn:
    """End the RPC with the gRPC status for a gateway answer, its message as the details."""
    trailing = tuple((name.decode(), value.decode()) for name, value in response.headers
                     if name == b"retry-after")
    if response.status == 499:
        await context.abort(grpc.StatusCode.CANCELLED, "the client went away")
    await context.abort(grpc_code(response.status), error_details(response.body), trailing)
    raise AssertionError("unreachable: abort raises")


def server_options(max_body_bytes: int, reuse_port: bool) -> list[tuple[str, int]]:
    """Return grpcio's options: messages up to the gateway's body limit, SO_REUSEPORT."""
    return [("grpc.max_receive_message_length", max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", int(reuse_port))]


async def start_grpc(app: GatewayApp, host: str, port: int, *,
                     reuse_port: bool = True) -> grpc.aio.Server:
    """Return a started gRPC server for `app` on host:port (port 0: any; read the bound
    port from `server.bound_port`); raise RuntimeError when the port cannot be bound."""
    server = grpc.aio.server(options=server_options(app.max_body_bytes, reuse_port))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(app), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen for gRPC on {host}:{port}")
    server.bound_port = bound  # grpc.aio.Server has no such attribute: ours
    await server.start()
    return server
