"""Reference proxies for bench/gateway.py's `--compare-bare`: what a proxy in Python costs
on this machine before any of the gateway's own work (no API key, balancing, metrics,
retries or limits). Each forwards every request to one replica, with its key.

- `bare-callback`: the floor. httptools parses both sides, uvloop callbacks only (no task,
  future or coroutine per request); each client connection has one replica connection.
- `bare-lean`: the gateway's own HTTP server (serving/gateway/fast_http.py: a task per
  request) and upstream pool (serving/gateway/upstream.py), with a `respond` that forwards
  and does nothing else. The gateway minus this is the cost of the gateway's logic.
- `bare-pool`: uvicorn's HTTP protocol (an ASGI app) on the same pool.
- `bare-aiohttp`: uvicorn with an aiohttp client session: why the gateway has its own pool.

Run by bench/gateway.py as `python bench/bare_proxies.py KIND --port P --upstream-port U`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script: bench/ is on the path, not the root

from gateway_load import INFER_PATH  # noqa: E402  (bench/gateway_load.py)
from replica import KEY  # noqa: E402  (bench/replica.py)

BARE_PROXIES = ("bare-callback", "bare-lean", "bare-pool", "bare-aiohttp")
JSON = b"application/json"
REPLICA_AUTH = (b"authorization", f"Bearer {KEY}".encode())


def asgi_proxy(kind: str, upstream_port: int) -> Any:
    """Return an ASGI app that forwards every request to the replica and nothing else."""
    import aiohttp

    from serving.gateway.upstream import UpstreamPool

    pool, sessions = UpstreamPool(), []
    url = f"http://127.0.0.1:{upstream_port}{INFER_PATH}"

    async def forward_aiohttp(body: bytes) -> tuple[int, bytes, bytes]:
        if not sessions:
            sessions.append(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30)))
        async with sessions[0].post(url, data=body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}) as reply:
            return reply.status, reply.headers["Content-Type"].encode(), await reply.read()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = (await receive()).get("body", b"")
        if kind == "bare-aiohttp":
            status, content_type, answer = await forward_aiohttp(body)
        else:
            reply = await pool.request("127.0.0.1", upstream_port, b"POST", INFER_PATH.encode(),
                                       [(b"content-type", JSON), REPLICA_AUTH], body)
            status, answer = reply.status, reply.body
            content_type = dict(reply.headers).get(b"content-type", JSON)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    return app


class LeanForwarder:
    """What FastHTTPProtocol needs of a gateway (`max_body_bytes`, `respond`), forwarding
    each request on the gateway's upstream pool and doing nothing else."""

    max_body_bytes = 64 * 1024 * 1024

    def __init__(self, upstream_port: int) -> None:
        from serving.gateway.upstream import UpstreamPool

        self.pool, self.upstream_port = UpstreamPool(), upstream_port

    async def respond(self, method: str, path: str, raw_path: bytes, query: bytes,
                      headers: Any, body: bytes, receive: Any = None) -> Any:
        from serving.gateway.responses import Response

        reply = await self.pool.request("127.0.0.1", self.upstream_port, b"POST",
                                        raw_path or path.encode(),
                                        [(b"content-type", JSON), REPLICA_AUTH], body)
        return Response(reply.status, reply.body, [(b"content-type", JSON)])


def serve_uvicorn(kind: str, port: int, upstream_port: int) -> None:
    """Serve bare-lean, bare-pool or bare-aiohttp with the standalone gateway's settings."""
    import uvicorn
    import uvloop

    from serving.gateway.fast_http import protocol_class

    lean = kind == "bare-lean"
    app: Any = LeanForwarder(upstream_port) if lean else asgi_proxy(kind, upstream_port)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="none",
                            http=protocol_class(app) if lean else "httptools",
                            lifespan="off", access_log=False, log_level="warning",
                            server_header=False, date_header=False, proxy_headers=False)
    uvloop.run(uvicorn.Server(config).serve())


def serve_callback(port: int, upstream_port: int) -> None:
    """Serve bare-callback (see the module docstring)."""
    import httptools
    import uvloop

    head = (b"POST " + INFER_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"content-type: application/json\r\nauthorization: " + REPLICA_AUTH[1]
            + b"\r\nContent-Length: %d\r\n\r\n")

    class Back(asyncio.Protocol):
        """The replica connection of one client connection: answers go to `front`."""

        def __init__(self, front: asyncio.Transport) -> None:
            self.front, self.body = front, bytearray()
            self.parser = httptools.HttpResponseParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.front.write(b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (
                                 self.parser.get_status_code(), len(self.body), self.body))
            self.body = bytearray()

        def connection_lost(self, exc: Exception | None) -> None:
            self.front.close()

    class Front(asyncio.Protocol):
        """One client connection; what arrives before the replica connection is held."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.back: Any = None
            self.early, self.body = bytearray(), bytearray()
            self.parser = httptools.HttpRequestParser(self)
            asyncio.get_running_loop().create_task(self.dial())

        async def dial(self) -> None:
            self.back, _ = await asyncio.get_running_loop().create_connection(
                lambda: Back(self.transport), "127.0.0.1", upstream_port)
            if self.early:
                self.parser.feed_data(bytes(self.early))

        def data_received(self, data: bytes) -> None:
            if self.back is None:
                self.early += data
            else:
                self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.back.write(head % len(self.body) + self.body)
            self.body = bytearray()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.back is not None:
                self.back.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Front, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=BARE_PROXIES)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    if args.kind == "bare-callback":
        serve_callback(args.port, args.upstream_port)
    else:
        serve_uvicorn(args.kind, args.port, args.upstream_port)


if __name__ == "__main__":
    main()
