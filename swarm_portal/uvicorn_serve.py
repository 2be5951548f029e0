"""The portal's uvicorn under `make run`: on a socket the launcher holds, shutting down
without dropping a request that was already on its way.

`python -m swarm_portal.uvicorn_serve --fd N` serves `swarm_portal.asgi:application` on
the listening socket N (a unix socket behind make run's gateways), inherited from the
launcher, which keeps it open across restarts (connections wait in its backlog meanwhile).
uvicorn's own shutdown stops accepting and, in the same step, closes every connection
that has no request under way yet, which includes one accepted a moment before whose
request bytes are still in its buffer: the client then sees the connection closed without
a response (2 of 70 requests in the chaos test). Here the server stops accepting first
and gives such requests a moment to arrive and start; a started request is finished as
uvicorn always does.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import uvicorn

APP = "swarm_portal.asgi:application"
# Long enough for a request already sent to be read (one event-loop turn on loopback, a
# round trip from further away), short against the supervisor's stop timeout (15 s).
REQUEST_ARRIVAL_GRACE_S = 0.5


class Server(uvicorn.Server):
    """uvicorn's server that stops accepting before it closes connections without a request."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # new connections queue in the launcher's socket's backlog
        await asyncio.sleep(REQUEST_ARRIVAL_GRACE_S)
        await super().shutdown(sockets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m swarm_portal.uvicorn_serve")
    parser.add_argument("--fd", type=int, required=True, help="an inherited listening socket")
    parser.add_argument("--backlog", type=int, default=2048)
    parser.add_argument("--app", default=APP, help="module:attribute of the ASGI app")
    parser.add_argument("--forwarded-allow-ips", default=None,
                        help="whose X-Forwarded-For/Proto to believe ('*' on a unix socket "
                             "only the gateway can open)")
    args = parser.parse_args(argv)
    config = uvicorn.Config(args.app, fd=args.fd, backlog=args.backlog, server_header=False,
                            access_log=False, lifespan="auto",
                            forwarded_allow_ips=args.forwarded_allow_ips)
    Server(config).run()


if __name__ == "__main__":
    main()
