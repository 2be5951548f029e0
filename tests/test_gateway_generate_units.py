"""The gateway's streaming pieces one at a time: which heads stream, the new metrics
summed over processes, and the core's streaming path (the hook the OpenAI endpoints use)
in front of a real tiny-LM replica.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from registry.demo_lm import cached_tiny_lm_archive
from serving.gateway import upstream_stream
from serving.gateway.app import GatewayApp
from serving.gateway.fast_http import protocol_class
from serving.gateway.forwarding import UpstreamRequest
from serving.gateway.requests import parse_model_path
from serving.gateway.responses import Response
from serving.gateway.streaming import StreamEnd, StreamingResponse, StreamSummary
from serving.gateway.upstream_stream import streams
from serving.replica.generation_runner import TEXT_SIGNATURE
from tests.gateway_helpers import (
    BEARER,
    GatewayThread,
    MemoryTableSource,
    replica_route,
    wait_for,
)
from tests.replica_models import ReplicaProcess, start_replica
from tests.test_gateway_generate import GENERATE, LONG, NAME, STREAM, lm_table
from tests.test_gateway_metrics_share import gateway_metrics, samples, share, value, write_snapshot

SSE = (b"content-type", b"text/event-stream; charset=utf-8")
JSON = (b"content-type", b"application/json")


@pytest.mark.parametrize(("status", "headers", "expected"), [
    (200, [SSE], True),
    (200, [JSON, (b"transfer-encoding", b"chunked")], True),
    (400, [SSE], True),
    (200, [JSON, (b"content-length", b"12")], False),  # a whole answer: read whole
    (503, [SSE], False),  # retried elsewhere, so read whole
    (502, [JSON, (b"transfer-encoding", b"chunked")], False),
])
def test_only_streaming_heads_below_500_are_relayed_as_they_come(status, headers, expected):
    assert streams(status, headers) is expected


def test_the_generate_paths_parse_like_infer():
    assert parse_model_path("/v2/models/m/generate_stream").action == "generate_stream"
    versioned = parse_model_path("/v2/models/m/versions/3/generate")
    assert (versioned.version, versioned.action) == (3, "generate")
    assert parse_model_path("/v2/models/m/generate/more") is None


def test_stream_metrics_are_summed_over_the_processes_sharing_a_port(tmp_path):
    here, there = gateway_metrics(), gateway_metrics()
    here.first_token("m", 0.02)
    there.first_token("m", 0.3)
    there.first_token("m", 0.4)
    here.stream_started("m")
    there.stream_started("m")
    there.stream_started("m")
    there.stream_ended("m")
    write_snapshot(tmp_path, "there", there)
    share(tmp_path, "here", here)
    scraped = samples(here.render())
    name = "swarm_gateway_time_to_first_token_seconds"
    assert value(scraped, f"{name}_count", model="m") == 3
    assert value(scraped, f"{name}_bucket", model="m", le="0.025") == 1
    assert value(scraped, f"{name}_sum", model="m") == pytest.approx(0.72)
    assert value(scraped, "swarm_gateway_streams_in_flight", model="m") == 2


# the core's streaming path, as another module (serving/gateway/openai.py) calls it

@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Iterator[ReplicaProcess]:
    archive = cached_tiny_lm_archive(tmp_path_factory.mktemp("tiny-lm"))
    process = start_replica(tmp_path_factory.mktemp("replica"), archive, "hf_causal_lm",
                            TEXT_SIGNATURE, name=NAME)
    yield process
    process.stop()


async def stream_through_core(replica: ReplicaProcess, body: dict[str, object],
                              chunks_wanted: int | None = None,
                              ) -> tuple[GatewayApp, list[bytes], StreamSummary, int]:
    """Run one generate_stream through GatewayCore.infer(stream=True), reading
    `chunks_wanted` chunks (None: all) before ending it as a client that hangs up;
    return the app, the chunks, the summary and the idle pooled connections after."""
    app = GatewayApp(MemoryTableSource(lm_table(replica_route(replica, 1))))
    await app.start()
    target = parse_model_path(f"/v2/models/{NAME}/generate_stream")
    assert target is not None
    runtime = await app.admit(target, [(b"authorization", BEARER["Authorization"].encode())])
    assert not isinstance(runtime, Response), runtime
    request = UpstreamRequest(b"POST", f"/v2/models/{NAME}/generate_stream".encode(),
                              [JSON], json.dumps(body).encode())
    response = await app.infer(runtime, target, request, app.now_s(), stream=True)
    assert isinstance(response, StreamingResponse)
    summaries: list[StreamSummary] = []
    response.on_end.append(summaries.append)
    chunks = []
    try:
        while (chunks_wanted is None or len(chunks) < chunks_wanted) \
                and (chunk := await response.next_chunk()):
            chunks.append(chunk)
        response.end(StreamEnd.CLIENT_GONE)
        await asyncio.sleep(0)  # a closed connection's transport lets go on the next step
        idle = app.pool.idle_count("127.0.0.1", replica.port)
    finally:
        response.end(StreamEnd.CLIENT_GONE)
        await app.aclose()
    assert len(summaries) == 1  # once, however many times end is called
    return app, chunks, summaries[0], idle


def test_the_core_stream_ends_with_the_usage_in_its_last_event(replica):
    body = {"text_input": "Hello, world.", "max_tokens": 9, "ignore_eos": True}
    app, chunks, summary, idle = asyncio.run(stream_through_core(replica, body))
    assert summary.outcome is StreamEnd.COMPLETE
    assert idle == 1  # the connection went back to the pool
    assert summary.body_bytes == sum(map(len, chunks))
    last = json.loads(summary.last_event)
    assert last["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 9
    assert app.in_flight() == {NAME: 0}


def test_the_core_stream_ended_early_releases_its_lease_as_cancelled(replica):
    app, chunks, summary, idle = asyncio.run(stream_through_core(replica, LONG,
                                                                 chunks_wanted=1))
    assert summary.outcome is StreamEnd.CLIENT_GONE
    assert idle == 0  # closed, never pooled: the replica sees the hang-up
    assert len(chunks) == 1 and summary.first_chunk_s is not None
    assert json.loads(summary.last_event)["text_output"]  # a delta, not the end
    assert app.in_flight() == {NAME: 0}


# flow control on the lean server

@pytest.fixture
def lean_server(replica) -> Iterator[uvicorn.Server]:
    """The lean HTTP/1.1 server (fast_http.py) in front of the replica, in a thread."""
    gateway = GatewayApp(MemoryTableSource(lm_table(replica_route(replica, 1))))
    with GatewayThread(gateway, http=protocol_class(gateway)) as thread:
        yield thread.server


def dechunk(data: bytes) -> bytes:
    """Return the body of a chunked transfer-encoding that ends with its last chunk."""
    parts = []
    while True:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return b"".join(parts)
        parts.append(data[:size])
        data = data[size + 2:]


@pytest.mark.parametrize("pause_at_bytes", [upstream_stream.PAUSE_AT_BYTES, 512])
def test_a_client_reading_slowly_pauses_the_stream_and_loses_nothing(replica, lean_server,
                                                                    monkeypatch,
                                                                    pause_at_bytes):
    """At 512 bytes the replica's socket is also left unread while the client lags (its
    chunks wait at the gateway: seen in most runs, timing decides), and must be read
    again as the client catches up, or the stream would never end."""
    monkeypatch.setattr(upstream_stream, "PAUSE_AT_BYTES", pause_at_bytes)
    with replica.client(timeout=60) as direct:
        whole = direct.post(GENERATE, json=LONG).json()["text_output"]
    port = lean_server.servers[0].sockets[0].getsockname()[1]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect(("127.0.0.1", port))
        protocol: Any = wait_for(lambda: next(iter(lean_server.server_state.connections), None),
                                 "the gateway to take the connection")
        # Small buffers on the gateway's side, so a few KB unread fill them (set on the
        # gateway's loop: transports are not thread-safe).
        shrunk = threading.Event()

        def shrink() -> None:
            protocol._transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            protocol._transport.set_write_buffer_limits(high=1024)
            shrunk.set()

        protocol._loop.call_soon_threadsafe(shrink)
        assert shrunk.wait(10)
        body = json.dumps(LONG).encode()
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: gw\r\nAuthorization: %s\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (STREAM.encode(), BEARER["Authorization"].encode(), len(body), body))
        wait_for(lambda: protocol._out.paused, "the gateway to stop writing to a full socket")
        received = b""
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, f"the stream ended early: {received[-200:]!r}"
            received += chunk
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    events = [json.loads(line[6:]) for line in dechunk(chunked).split(b"\n")
              if line.startswith(b"data: ")]
    assert "".join(event["text_output"] for event in events) == whole
    assert events[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"])
def test_an_http_1_0_client_gets_the_stream_unframed_and_the_connection_closes(
        replica, lean_server, connection):
    """HTTP/1.0 has no chunked framing (RFC 9112 section 7): the events arrive as they
    are, and the close ends the body, even where the client asked to keep it alive."""
    short = {"text_input": "Hello, world.", "max_tokens": 12, "ignore_eos": True}
    with replica.client(timeout=60) as direct:
        whole = direct.post(GENERATE, json=short).json()["text_output"]
    port = lean_server.servers[0].sockets[0].getsockname()[1]
    body = json.dumps(short).encode()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST %s HTTP/1.0\r\nHost: gw\r\nAuthorization: %s\r\n%s"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (STREAM.encode(), BEARER["Authorization"].encode(), connection,
                        len(body), body))
        while chunk := sock.recv(65536):  # b"": the gateway closed (a timeout raises)
            received += chunk
    head, _, events_text = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head
    events = [json.loads(line[6:]) for line in events_text.split(b"\n")
              if line.startswith(b"data: ")]
    assert "".join(event["text_output"] for event in events) == whole
    assert events[-1]["finish_reason"] == "length"
