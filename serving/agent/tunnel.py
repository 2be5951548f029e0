"""The agent's end of the tunnels: one WebSocket to each gateway, for a node behind NAT.

`Tunnels` (used by the agent loop) keeps one `TunnelClient` per gateway URL the portal
lists in heartbeat replies, in a thread with its own event loop. Each client connects to
`<url>` with the node id and its tunnel key, serves the streams the gateway opens
(swarm_protocol/tunnel.py) by connecting each to a replica port on this host's loopback
(only ports of the agent's replica range), and reconnects after any loss with an
exponential back-off and jitter. So the replicas of a tunnel node listen on 127.0.0.1 only.

`ReachabilityProbe` answers the portal's reachability check while the agent joins
(serving/services/reachability.py): it listens on a port of the replica range and writes
the nonce to every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import socket
import threading
from collections.abc import Callable, Collection
from types import TracebackType

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from swarm_protocol.agent_messages import RegisterRequest
from swarm_protocol.tunnel import (
    CLOSE_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    NODE_HEADER,
    PING_INTERVAL_S,
    PING_TIMEOUT_S,
    Mux,
    TunnelProtocolError,
    set_nodelay,
)

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 5.0  # and a heartbeat that gets through retries at once (nudge)
STABLE_AFTER_S = 10.0  # a tunnel up this long resets the back-off
OPEN_TIMEOUT_S = 5.0  # a SYN into a cut link hangs: give up and retry soon


def backoff_s(failures: int, jitter: float) -> float:
    """Return the wait before reconnect number `failures` (>= 1): exponential, capped, with
    "equal jitter" (`jitter` in [0, 1)) so nodes cut off together do not return together."""
    ceiling_s: float = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(failures - 1, 16))
    return ceiling_s * (0.5 + 0.5 * jitter)


class TunnelClient:
    """Keeps one tunnel to one gateway open until cancelled."""

    def __init__(self, url: str, node_id: int, tunnel_key: str, ports: Collection[int],
                 jitter: Callable[[], float] = random.random) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {tunnel_key}", NODE_HEADER: str(node_id)}
        self._ports = ports
        self._jitter = jitter
        self.connected = asyncio.Event()
        self._nudged = asyncio.Event()
        self.connections = 0  # handshakes that succeeded (for tests)
        self.refusals = 0  # handshakes the gateway refused (401: unknown node or wrong key)
        self._connecting: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Connect, serve, and reconnect with back-off, forever (until cancelled)."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started_s = loop.time()
            try:
                await self._serve_once()
            except InvalidStatus as exc:
                self.refusals += 1
                log.warning("gateway %s refused the tunnel: HTTP %d", self.url,
                            exc.response.status_code)
            except (OSError, InvalidHandshake, ConnectionClosed, TunnelProtocolError,
                    TimeoutError) as exc:
                log.info("tunnel to %s lost or not opened: %s", self.url, exc)
            except Exception:  # asyncio.TimeoutError on 3.10, or a bug: retry all the same
                log.exception("tunnel to %s failed", self.url)
            finally:
                self.connected.clear()
            failures = 1 if loop.time() - started_s >= STABLE_AFTER_S else failures + 1
            self._nudged.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), backoff_s(failures, self._jitter()))

    def nudge(self) -> None:
        """Retry now if waiting to reconnect: the portal answered a heartbeat, so the
        network is back (a node whose link returns serves again within a heartbeat)."""
        if not self.connected.is_set():
            self._nudged.set()

    async def _serve_once(self) -> None:
        async with connect(self.url, additional_headers=self._headers,
                           open_timeout=OPEN_TIMEOUT_S, ping_interval=PING_INTERVAL_S,
                           ping_timeout=PING_TIMEOUT_S, close_timeout=CLOSE_TIMEOUT_S,
                           max_size=MAX_MESSAGE_BYTES + 65536,
                           compression=None, user_agent_header=None) as websocket:
            self.connections += 1
            set_nodelay(websocket.transport)
            self.connected.set()
            log.info("tunnel to %s open", self.url)
            await Mux(websocket, self._open).run()

    def _open(self, mux: Mux, stream_id: int, port: int) -> None:
        stream = mux.streams[stream_id]
        if port not in self._ports:
            log.warning("gateway %s asked for port %d, outside the replica range", self.url,
                        port)
            stream.connection_lost(None)  # tells the gateway the stream ended
            return

        async def connect_local() -> None:
            try:
                await asyncio.get_running_loop().create_connection(
                    lambda: stream, LOOPBACK, port)
            except OSError:
                stream.connection_lost(None)

        task = asyncio.ensure_future(connect_local())
        self._connecting.add(task)  # kept until done: the loop holds tasks only weakly
        task.add_done_callback(self._connecting.discard)


class Tunnels:
    """The node's tunnels to every gateway, run on an event loop in a thread of their own.

    Thread-safe: the agent calls `update` after each heartbeat and `close` at the end.
    """

    def __init__(self, ports: Collection[int]) -> None:
        self._ports = frozenset(ports)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._clients: dict[str, tuple[TunnelClient, asyncio.Task[None]]] = {}
        self._identity: tuple[int, str] | None = None
        self._warned_no_urls = False

    def update(self, node_id: int, tunnel_key: str, urls: Collection[str]) -> None:
        """Keep a tunnel open to each URL (an empty list keeps the current ones: the
        portal could not say this time)."""
        if not urls or not tunnel_key:
            if not self._warned_no_urls and not self._clients:
                self._warned_no_urls = True
                log.warning("tunnel mode, but the portal lists no gateway with a tunnel port "
                            "(swarm-gateway --tunnel-port): this node cannot serve yet")
            return
        self._warned_no_urls = False
        loop = self._start()
        loop.call_soon_threadsafe(self._apply, node_id, tunnel_key, frozenset(urls))

    def connected_urls(self) -> list[str]:
        """Return the gateways whose tunnel is up (approximate: read across threads)."""
        return sorted(url for url, (client, _) in list(self._clients.items())
                      if client.connected.is_set())

    def close(self) -> None:
        """Close every tunnel and stop the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(self._stop)
        thread.join(timeout=10)
        self._loop = self._thread = None

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop: asyncio.AbstractEventLoop
            try:
                import uvloop  # the worker depends on it; plain asyncio works too
                loop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            self._loop = loop
            self._thread = threading.Thread(target=loop.run_forever, name="tunnels",
                                            daemon=True)
            self._thread.start()
        return self._loop

    def _apply(self, node_id: int, tunnel_key: str, urls: frozenset[str]) -> None:
        if self._identity != (node_id, tunnel_key):  # a new node or key: start over
            self._identity = (node_id, tunnel_key)
            self._cancel(set(self._clients))
        self._cancel(set(self._clients) - urls)
        for client, _ in self._clients.values():
            client.nudge()
        for url in sorted(urls - set(self._clients)):
            client = TunnelClient(url, node_id, tunnel_key, self._ports)
            self._clients[url] = (client, asyncio.ensure_future(client.run()))
            log.info("opening a tunnel to gateway %s", url)

    def _cancel(self, urls: Collection[str]) -> None:
        for url in urls:
            _, task = self._clients.pop(url)
            task.cancel()

    def _stop(self) -> None:
        assert self._loop is not None
        self._cancel(set(self._clients))
        loop = self._loop
        # Let the cancelled clients close their connections, then stop.
        loop.call_later(0.2, loop.stop)


class ReachabilityProbe:
    """Answers connections on a replica-range port with a nonce while the agent joins."""

    def __init__(self, bind_host: str, ports: Collection[int], tunnel: bool = False) -> None:
        self.tunnel = tunnel  # tunnel mode asked for: nothing to probe
        self.nonce = secrets.token_urlsafe(24)
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for port in () if tunnel else ports:
            sock = socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET)
            try:
                sock.bind((bind_host, port))
                sock.listen(16)
            except OSError:
                sock.close()
                continue
            self._sock, self.port = sock, port
            break

    def fields(self, request: RegisterRequest) -> RegisterRequest:
        """Return the join request with the probe's port and nonce (or the tunnel asked)."""
        return dataclasses.replace(request, tunnel=self.tunnel, probe_port=self.port,
                                   probe_nonce=self.nonce if self.port else "")

    def __enter__(self) -> ReachabilityProbe:
        if self._sock is not None:
            self._sock.settimeout(0.1)
            self._thread = threading.Thread(target=self._answer, name="reach-probe",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()

    def _answer(self) -> None:
        assert self._sock is not None
        line = f"{self.nonce}\n".encode()
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.settimeout(1.0)
                conn.sendall(line)
