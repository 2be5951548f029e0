"""The gateway's streaming pieces one at a time: which heads stream, the new metrics
summed over processes, and the core's streaming path (the hook the OpenAI endpoints use)
in front of a real tiny-LM replica.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from registry.demo_lm import cached_tiny_lm_archive
from serving.gateway.app import GatewayApp
from serving.gateway.forwarding import UpstreamRequest
from serving.gateway.requests import parse_model_path
from serving.gateway.responses import Response
from serving.gateway.streaming import StreamEnd, StreamingResponse, StreamSummary
from serving.gateway.upstream_stream import streams
from serving.replica.generation_runner import TEXT_SIGNATURE
from tests.gateway_helpers import BEARER, MemoryTableSource, replica_route
from tests.replica_models import ReplicaProcess, start_replica
from tests.test_gateway_generate import LONG, NAME, lm_table
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
