"""The agent's HTTP client for the portal's agent API (register, heartbeat, artifacts)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx

# httpcore retries this import on every call when it is missing: import it once, on purpose.
import sniffio  # noqa: F401

from swarm_protocol import agent_messages as protocol
from swarm_protocol.agent_messages import (
    HeartbeatRequest,
    HeartbeatResponse,
    Message,
    RegisterRequest,
    RegisterResponse,
)

DEFAULT_TIMEOUT_S = 10.0
ARTIFACT_READ_TIMEOUT_S = 60.0
_ERROR_TEXT_CHARS = 300
M = TypeVar("M", bound=Message)


class PortalError(RuntimeError):
    """The portal refused a call or answered with something unexpected."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class PortalUnreachable(PortalError):
    """The portal could not be reached, failed (5xx) or asked us to slow down (429): retry."""


class CredentialsRevoked(PortalError):
    """The portal no longer accepts this node's secret (401): the node was removed."""


class PortalClient:
    """Calls the portal's agent API; every call has a timeout."""

    def __init__(self, portal_url: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 node_secret: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.portal_url = portal_url.rstrip("/")
        self.node_secret = node_secret
        self._http = httpx.Client(timeout=timeout_s, transport=transport)
        self._artifact_timeout = httpx.Timeout(timeout_s, read=ARTIFACT_READ_TIMEOUT_S)

    def register(self, request: RegisterRequest) -> RegisterResponse:
        """Join the pool with a join token; return the node's credentials."""
        reply = self._post(protocol.REGISTER_PATH, request.to_dict(), authenticated=False)
        return _parse(RegisterResponse, reply, "register")

    def heartbeat(self, request: HeartbeatRequest) -> HeartbeatResponse:
        """Send devices and replica figures; return the replicas the portal wants here."""
        reply = self._post(protocol.HEARTBEAT_PATH, request.to_dict(), authenticated=True)
        return _parse(HeartbeatResponse, reply, "heartbeat")

    def deregister(self) -> None:
        """Tell the portal this node is leaving."""
        self._post(protocol.DEREGISTER_PATH, {}, authenticated=True)

    @contextlib.contextmanager
    def open_artifact(self, sha256: str) -> Iterator[httpx.Response]:
        """Yield the streaming reply for an artifact (status already checked)."""
        url = self.portal_url + protocol.ARTIFACT_PATH.format(sha256=sha256)
        try:
            with self._http.stream("GET", url, headers=self._auth_headers(),
                                   timeout=self._artifact_timeout) as response:
                if response.status_code != httpx.codes.OK:
                    response.read()
                    raise _error_for(response, f"artifact {sha256[:12]}")
                yield response
        except httpx.TransportError as error:
            raise PortalUnreachable(f"artifact {sha256[:12]}: {_describe(error)}") from error

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _post(self, path: str, body: dict[str, Any], authenticated: bool) -> httpx.Response:
        headers = self._auth_headers() if authenticated else {}
        try:
            response = self._http.post(self.portal_url + path, json=body, headers=headers)
        except httpx.TransportError as error:
            raise PortalUnreachable(f"{path}: {_describe(error)}") from error
        if response.status_code >= httpx.codes.BAD_REQUEST:
            raise _error_for(response, path)
        return response

    def _auth_headers(self) -> dict[str, str]:
        if not self.node_secret:
            raise PortalError("this node has no credentials yet: register first")
        return {"Authorization": f"Bearer {self.node_secret}"}


def _parse(kind: type[M], response: httpx.Response, what: str) -> M:
    try:
        return kind.from_dict(response.json())
    except (ValueError, protocol.ProtocolError) as error:
        raise PortalError(f"portal sent a malformed {what} reply: {error}",
                          response.status_code) from error


def _error_for(response: httpx.Response, what: str) -> PortalError:
    status = response.status_code
    message = f"{what}: HTTP {status}: {_error_text(response)}"
    if status == httpx.codes.UNAUTHORIZED:
        return CredentialsRevoked(message, status)
    if status >= httpx.codes.INTERNAL_SERVER_ERROR or status == httpx.codes.TOO_MANY_REQUESTS:
        return PortalUnreachable(message, status)
    return PortalError(message, status)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:_ERROR_TEXT_CHARS] or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return str(body)[:_ERROR_TEXT_CHARS]


def _describe(error: httpx.TransportError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
