"""A server that poses as a replica, for tests of what the gateway will talk to.

    python -m tests.impostor --host H --port P --log-file F [--cert-file C --key-file K]

Serves plain HTTP, or TLS with the given certificate and key. Every request it receives is
appended to the log file as one JSON line ({"method", "path", "authorization"}), so a test
can assert that nothing (and no replica key) ever reached it; it answers 200 with a fixed
OIP-shaped body. Prints "LISTENING" on stdout once its port is bound.
"""

from __future__ import annotations

import argparse
import json
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ANSWER = json.dumps({"model_name": "impostor", "outputs": [
    {"name": "scores", "datatype": "FP32", "shape": [1, 1], "data": [0.0]}]}).encode()


def handler_logging_to(log_file: Path) -> type[BaseHTTPRequestHandler]:
    """Return a request handler class that records each request in `log_file`."""
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            with log_file.open("a") as out:
                out.write(json.dumps({"method": self.command, "path": self.path,
                                      "authorization": self.headers.get("Authorization")})
                          + "\n")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(ANSWER)))
            self.end_headers()
            self.wfile.write(ANSWER)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(prog="impostor")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-file", type=Path, required=True)
    parser.add_argument("--cert-file")
    parser.add_argument("--key-file")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), handler_logging_to(args.log_file))
    if args.cert_file:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert_file, args.key_file)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print("LISTENING", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
