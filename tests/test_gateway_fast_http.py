"""The gateway's lean HTTP/1.1 server (serving/gateway/fast_http.py) at the socket level.

Real processes and sockets: the standalone gateway process (which serves with the lean
protocol) in front of the shared real replicas, spoken to with raw bytes where a client
library would hide what is tested (malformed heads, pipelining, hanging up mid-request).
The pass-through hand-over to uvicorn is shown on a gateway served in a thread, with a
small HTTP server standing in for the portal behind it.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.gateway.app import GatewayApp
from serving.gateway.fast_asgi import starts_gateway_request
from serving.gateway.fast_http import protocol_class
from serving.gateway.filesource import write_table
from serving.gateway.portal_proxy import PortalProxy
from serving.gateway.service import PassThroughApp
from tests.gateway_helpers import (
    BEARER,
    MLP,
    SLOW,
    SLOW_INFO,
    Fleet,
    GatewayThread,
    MemoryTableSource,
    StandaloneGateway,
    deployment,
    expected_scores,
    features,
    metric_value,
    mlp_request,
    replica_route,
    shared_fleet,
    slow_request,
    table,
    wait_for,
)

pytestmark = pytest.mark.slow
INFER, SLOW_INFER = f"/v2/models/{MLP}/infer", f"/v2/models/{SLOW}/infer"
MAX_BODY_BYTES = 4096
AUTH = BEARER["Authorization"]


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory) -> Fleet:
    return shared_fleet(request, tmp_path_factory)


@pytest.fixture(scope="module")
def table_path(fleet, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fast-http") / "table.json"
    write_table(path, table(deployment(MLP, [replica_route(fleet.mlp_v1[0], 1)]),
                            deployment(SLOW, [replica_route(fleet.slow, 2)], info=SLOW_INFO)))
    return path


@pytest.fixture(scope="module")
def gateway(table_path) -> Iterator[StandaloneGateway]:
    process = StandaloneGateway(table_path, "--max-body-bytes", str(MAX_BODY_BYTES))
    yield process
    process.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def infer_request(rows: np.ndarray, *, extra: bytes = b"") -> bytes:
    body = json.dumps(mlp_request(rows)).encode()
    return (b"POST %s HTTP/1.1\r\nHost: gw\r\nAuthorization: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (INFER.encode(), AUTH.encode(), len(body), extra, body))


def raw_post(path: str, body: bytes = b"", length: int | None = None) -> bytes:
    """A POST to `path` with the API key and `body`; `length`: the Content-Length to declare
    (default: the body's)."""
    return (b"POST %s HTTP/1.1\r\nHost: gw\r\nAuthorization: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), AUTH.encode(), len(body) if length is None else length, body))


def slow_metric(gateway: StandaloneGateway, name: str) -> float:
    """The gateway's metric `name` for the slow model, read from /metrics now."""
    return metric_value(httpx.get(f"{gateway.url}/metrics").text, name, model=SLOW)


class Responses:
    """Reads HTTP/1.1 responses (Content-Length framed) off one socket, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def read(self) -> tuple[int, dict[str, str], bytes]:
        """Return (status, headers, body) of the next response (AssertionError at EOF)."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"the connection closed; read so far: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            assert self._fill(), "the connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        """Return whether the server closed the connection (nothing more was sent)."""
        return not self.buffer and not self._fill()


def scores(body: bytes) -> np.ndarray:
    output = json.loads(body)["outputs"][0]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def test_a_request_line_the_parser_refuses_gets_400_json_and_the_connection_closes(gateway):
    with connect(gateway.port) as sock:
        sock.sendall(b"BREW /v2 HTCPCP/1.0\r\n\r\n")
        responses = Responses(sock)
        status, headers, body = responses.read()
        assert status == 400
        assert headers["content-type"] == "application/json"
        assert "malformed HTTP request" in json.loads(body)["error"]
        assert responses.closed()


@pytest.mark.parametrize("request_line", [b"GET /v2/\x01 HTTP/1.1",
                                          b"GET /v2/health/live HTTP/9.9"])
def test_a_request_target_or_version_the_parser_refuses_gets_400_json(gateway, request_line):
    with connect(gateway.port) as sock:
        sock.sendall(request_line + b"\r\nHost: gw\r\n\r\n")
        responses = Responses(sock)
        status, _headers, body = responses.read()
        assert status == 400, body
        assert "malformed HTTP request" in json.loads(body)["error"]
        assert responses.closed()


def test_an_asterisk_target_is_no_endpoint_of_ours(gateway):
    with connect(gateway.port) as sock:
        sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n")
        status, _headers, body = Responses(sock).read()
    assert status == 404
    assert json.loads(body) == {"error": "no such endpoint: *"}


def test_a_declared_oversize_body_gets_413_before_it_is_sent(gateway):
    with connect(gateway.port) as sock:
        sock.sendall(raw_post(INFER, length=MAX_BODY_BYTES + 1))
        responses = Responses(sock)
        status, _headers, body = responses.read()
        assert status == 413
        assert str(MAX_BODY_BYTES) in json.loads(body)["error"]
        assert responses.closed()


def test_a_413_arrives_whole_while_the_client_is_still_sending_its_body(gateway):
    body = b"x" * (MAX_BODY_BYTES * 16)
    with connect(gateway.port) as sock:
        sock.sendall(raw_post(INFER, body))
        responses = Responses(sock)
        status, _headers, _body = responses.read()
        assert status == 413
        assert responses.closed()


def test_a_head_that_never_ends_gets_431_and_the_connection_closes(gateway):
    with connect(gateway.port) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Padding: " + b"p" * 300_000)
        responses = Responses(sock)
        status, _headers, body = responses.read()
        assert status == 431
        assert "longer than" in json.loads(body)["error"]
        assert responses.closed()


def test_a_chunked_body_growing_past_the_limit_gets_413(gateway):
    chunk = b"x" * 1000
    with connect(gateway.port) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: gw\r\nAuthorization: %s\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" % (INFER.encode(), AUTH.encode()))
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) * 5)
        responses = Responses(sock)
        status, _headers, _body = responses.read()
        assert status == 413
        assert responses.closed()


def test_a_chunked_request_body_is_forwarded_whole(gateway):
    rows = features(3, seed=4)
    body = json.dumps(mlp_request(rows)).encode()
    chunks = [body[i:i + 50] for i in range(0, len(body), 50)]
    with connect(gateway.port) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: gw\r\nAuthorization: %s\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" % (INFER.encode(), AUTH.encode()))
        for chunk in chunks:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        status, _headers, answer = Responses(sock).read()
    assert status == 200
    np.testing.assert_allclose(scores(answer), expected_scores(rows), rtol=1e-5, atol=1e-5)


def test_expect_100_continue_is_answered_before_the_body_is_sent(gateway):
    rows = features(2, seed=5)
    request = infer_request(rows, extra=b"Expect: 100-continue\r\n")
    head, body = request.split(b"\r\n\r\n", 1)
    with connect(gateway.port) as sock:
        sock.sendall(head + b"\r\n\r\n")
        responses = Responses(sock)
        status, _headers, _body = responses.read()
        assert status == 100
        sock.sendall(body)
        status, _headers, answer = responses.read()
    assert status == 200
    np.testing.assert_allclose(scores(answer), expected_scores(rows), rtol=1e-5, atol=1e-5)


def test_pipelined_requests_are_answered_in_order_on_one_connection(gateway):
    # The slow request first: answering in order means the quick ones wait behind it.
    slow = json.dumps(slow_request()).encode()
    batches = [features(n, seed=n) for n in (1, 2, 3)]
    with connect(gateway.port) as sock:
        sock.sendall(raw_post(SLOW_INFER, slow)
                     + b"GET /v2/health/live HTTP/1.1\r\nHost: gw\r\n\r\n"
                     + b"".join(infer_request(rows) for rows in batches))
        responses = Responses(sock)
        status, _headers, body = responses.read()
        assert status == 200 and json.loads(body)["outputs"]
        assert responses.read()[2] == b'{"live":true}'
        for rows in batches:
            status, _headers, answer = responses.read()
            assert status == 200
            assert scores(answer).shape == (len(rows), 3)
            np.testing.assert_allclose(scores(answer), expected_scores(rows), rtol=1e-5,
                                       atol=1e-5)


def test_one_connection_is_kept_alive_across_requests(gateway):
    with connect(gateway.port) as sock:
        responses = Responses(sock)
        for seed in range(20):
            rows = features(1, seed=seed)
            sock.sendall(infer_request(rows))
            status, headers, answer = responses.read()
            assert status == 200 and "connection" not in headers
            np.testing.assert_allclose(scores(answer), expected_scores(rows), rtol=1e-5,
                                       atol=1e-5)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        status, headers, _body = responses.read()
        assert status == 200 and headers["connection"] == "close"
        assert responses.closed()


def test_a_client_hanging_up_mid_request_is_counted_and_harms_nothing(gateway):
    cancelled_before = slow_metric(gateway, "swarm_gateway_cancelled_total")
    slow = json.dumps(slow_request()).encode()
    with connect(gateway.port) as sock:  # hangs up halfway through its body
        sock.sendall(raw_post(INFER, b"{" * 100, length=3000))
    with connect(gateway.port) as sock:  # hangs up while the replica works
        sock.sendall(raw_post(SLOW_INFER, slow))
        wait_for(lambda: slow_metric(gateway, "swarm_gateway_in_flight") >= 1,
                 "the slow request to reach its replica")
    wait_for(lambda: slow_metric(gateway, "swarm_gateway_cancelled_total") > cancelled_before,
             "the hang-up to be counted")
    wait_for(lambda: slow_metric(gateway, "swarm_gateway_in_flight") == 0,
             "the lease to come back")
    with httpx.Client(base_url=gateway.url, headers=BEARER, timeout=30) as client:
        rows = features(2)
        answer = client.post(INFER, json=mlp_request(rows))
    assert answer.status_code == 200


def test_sigterm_lets_the_request_in_flight_finish_then_exits(table_path):
    gateway = StandaloneGateway(table_path)
    try:
        slow = json.dumps(slow_request()).encode()
        with connect(gateway.port) as sock, connect(gateway.port) as idle:
            sock.sendall(raw_post(SLOW_INFER, slow))
            wait_for(lambda: slow_metric(gateway, "swarm_gateway_in_flight") >= 1,
                     "the slow request to reach its replica")
            gateway.process.send_signal(signal.SIGTERM)
            status, headers, body = Responses(sock).read()
            assert status == 200 and json.loads(body)["outputs"]
            assert headers["connection"] == "close"
            assert Responses(idle).closed()  # the idle keep-alive connection is closed
        # uvicorn's server re-raises the signal once its graceful stop is done.
        assert gateway.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        gateway.stop()


# the pass-through: what is not the gateway's goes to uvicorn's protocol (a fake portal)


class _Portal(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"portal:{self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def pass_through(fleet) -> Iterator[int]:
    """A gateway with --pass-through's app on the lean protocol, in a thread; its port."""
    portal = ThreadingHTTPServer(("127.0.0.1", 0), _Portal)
    threading.Thread(target=portal.serve_forever, daemon=True).start()
    gateway = GatewayApp(MemoryTableSource(table(deployment(
        MLP, [replica_route(fleet.mlp_v1[0], 1)]))))
    proxy = PortalProxy(f"http://127.0.0.1:{portal.server_address[1]}")
    app = PassThroughApp(gateway, proxy)
    try:
        with GatewayThread(gateway, http=protocol_class(gateway, app), asgi_app=app) as thread:
            yield thread.port
    finally:
        portal.shutdown()
        portal.server_close()


def test_a_connection_moves_to_uvicorn_at_its_first_portal_request(pass_through):
    with connect(pass_through) as sock:
        responses = Responses(sock)
        sock.sendall(infer_request(features(1)))
        assert responses.read()[0] == 200
        sock.sendall(b"GET /models/?page=2 HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert responses.read()[2] == b"portal:/models/?page=2"
        # uvicorn serves the connection from now on, the gateway's paths included.
        sock.sendall(infer_request(features(1)))
        assert responses.read()[0] == 200
        sock.sendall(b"GET /login HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert responses.read()[2] == b"portal:/login"


def test_a_portal_request_pipelined_behind_a_gateway_request_is_answered_in_order(
        pass_through):
    with connect(pass_through) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: gw\r\n\r\n"
                     b"GET /dashboards/ HTTP/1.1\r\nHost: gw\r\n\r\n"
                     + infer_request(features(1)))
        responses = Responses(sock)
        assert responses.read()[2] == b'{"live":true}'
        assert responses.read()[2] == b"portal:/dashboards/"
        assert responses.read()[0] == 200


def test_which_reads_start_a_gateway_request():
    assert starts_gateway_request(b"POST /v2/models/m/infer HTTP/1.1\r\n")
    assert starts_gateway_request(b"GET /metrics HTTP/1.1\r\n")
    assert starts_gateway_request(b"\r\nGET /v2 HTTP/1.1\r\n")
    assert starts_gateway_request(b"GET /v2?x HTTP/1.1\r\n")
    assert starts_gateway_request(b"x" * 40)  # not HTTP at all: the gateway's 400
    assert starts_gateway_request(b"GET /v2x HTTP/1.1\r\n") is False
    assert starts_gateway_request(b"GET /metricsx HTTP/1.1\r\n") is False
    assert starts_gateway_request(b"GET /api/models/ HTTP/1.1\r\n") is False
    assert starts_gateway_request(b"GET /ws/live HTTP/1.1\r\n") is False
    for partial in (b"GE", b"GET ", b"GET /", b"GET /v", b"GET /v2", b"GET /metr"):
        assert starts_gateway_request(partial) is None, partial
