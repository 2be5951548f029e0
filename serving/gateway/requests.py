"""Reading a client request: the `/v2/models/...` path and a size-limited body."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from serving.gateway.responses import Receive
from swarm_protocol.wire_numbers import parse_count

MODELS_PREFIX = "/v2/models/"
ACTIONS = frozenset({"", "ready", "infer", "generate", "generate_stream"})
# The actions that run the model (POST, admitted, balanced); the others are GETs.
INFERENCE_ACTIONS = frozenset({"infer", "generate", "generate_stream"})
UNKNOWN_VERSION = -1  # a version segment that is not a number: no table lists it
MAX_VERSION = 2**31 - 1  # the database's version column


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class BodyTooLarge:
    """Marks a body the transport stopped reading past the size limit (nothing kept)."""

    __slots__ = ()


BODY_TOO_LARGE = BodyTooLarge()


@dataclass(frozen=True, slots=True)
class ModelPath:
    """`/v2/models/{name}[/versions/{version}][/ready|/infer|/generate|/generate_stream]`,
    split."""

    name: str
    version: int | None
    version_text: str
    action: str  # "" (metadata), "ready", "infer", "generate" or "generate_stream"


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
        parsed = parse_count(version_text, MAX_VERSION)
        # Only the canonical spelling: the replica routes `/versions/7`, never `/versions/07`.
        version = parsed if parsed is not None and str(parsed) == version_text \
            else UNKNOWN_VERSION
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
    """One request's watch: cancels its task when the client disconnects (see below)."""

    __slots__ = ("_receive", "_watcher", "client_gone", "since_s", "task")

    def __init__(self, task: asyncio.Task[object], receive: Receive, since_s: float) -> None:
        self.task = task
        self.client_gone = False
        self.since_s = since_s
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._watcher = self.task.get_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        self.task.cancel()  # the attempt releases its lease as CANCELLED on the way out


class DisconnectWatcher:
    """Watches requests for a client disconnect, each from `after_s` after it began.

    A watcher task per request costs more than the rest of the gateway's own work, so it
    starts only once a request has run `after_s`: a shorter request just finishes (its
    answer goes nowhere), a longer one is cancelled within `after_s` of the disconnect.
    One timer serves every request (a loop timer per request costs ~2 us): it fires when
    the oldest pending request reaches `after_s`, starts the watchers that are due, and
    re-arms for the next oldest.
    """

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._pending: dict[DisconnectWatch, None] = {}  # oldest first: insertion order
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, loop: asyncio.AbstractEventLoop, receive: Receive) -> DisconnectWatch:
        """Start watching the current request (call `stop` when it is done)."""
        task = asyncio.current_task(loop)
        assert task is not None
        now_s = loop.time()
        watch = DisconnectWatch(task, receive, now_s)
        if loop is not self._loop:  # a new event loop (tests): the old timer never fires
            self._pending.clear()
            self._loop, self._timer = loop, None
        self._pending[watch] = None
        if self._timer is None:
            self._timer = loop.call_at(now_s + self.after_s, self._start_due)
        return watch

    def stop(self, watch: DisconnectWatch) -> None:
        """Stop watching a request (it is done)."""
        watcher = watch._watcher
        if watcher is None:
            self._pending.pop(watch, None)
        else:
            watcher.cancel()

    def _start_due(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        pending = self._pending
        due_s = loop.time() - self.after_s + 0.001  # loop timers may fire a little early
        while pending:
            oldest = next(iter(pending))
            if oldest.since_s > due_s:
                self._timer = loop.call_at(oldest.since_s + self.after_s, self._start_due)
                return
            del pending[oldest]
            oldest._start()
