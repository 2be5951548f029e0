"""Reading a client request: the `/v2/models/...` path and a size-limited body."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from serving.gateway.responses import Receive

MODELS_PREFIX = "/v2/models/"
ACTIONS = frozenset({"", "ready", "infer"})
UNKNOWN_VERSION = -1  # a version segment that is not a number: no table lists it


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


@dataclass(frozen=True, slots=True)
class ModelPath:
    """`/v2/models/{name}[/versions/{version}][/ready|/infer]`, split."""

    name: str
    version: int | None
    version_text: str
    action: str  # "" (metadata), "ready" or "infer"


def parse_model_path(path: str) -> ModelPath | None:
    """Return the parts of a model path, or None when it is not one."""
    parts = path[len(MODELS_PREFIX):].split("/")
    name = parts[0]
    if not name:
        return None
    version: int | None = None
    version_text = ""
    rest = parts[1:]
    if len(rest) >= 2 and rest[0] == "versions":
        version_text = rest[1]
        version = int(version_text) if version_text.isdigit() else UNKNOWN_VERSION
        rest = rest[2:]
    if len(rest) > 1:
        return None
    action = rest[0] if rest else ""
    if action not in ACTIONS:
        return None
    return ModelPath(name, version, version_text, action)


async def read_body(receive: Receive, limit_bytes: int) -> bytes | None:
    """Return the whole body, or None once it grows past `limit_bytes`."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit_bytes else None
    chunks = [body]
    size_bytes = len(body)
    while size_bytes <= limit_bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size_bytes += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks) if size_bytes <= limit_bytes else None
    return None


class DisconnectWatch:
    """Cancels the current task when the client disconnects, checked from `after_s` on.

    A watcher task per request costs more than the rest of the gateway's own work, so it
    starts only once a request has run `after_s`: a shorter request just finishes (its
    answer goes nowhere), a longer one is cancelled within `after_s` of the disconnect.
    """

    __slots__ = ("_receive", "_timer", "_watcher", "client_gone", "task")

    def __init__(self, receive: Receive, after_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.client_gone = False
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = task.get_loop().call_later(
            after_s, self._start)

    def _start(self) -> None:
        self._timer = None
        self._watcher = self.task.get_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        self.task.cancel()  # the attempt releases its lease as CANCELLED on the way out

    def stop(self) -> None:
        """Stop watching (the request is done)."""
        if self._timer is not None:
            self._timer.cancel()
        elif self._watcher is not None:
            self._watcher.cancel()
