"""generate and generate_stream through the gateway, in front of real tiny-LM replicas.

Real processes: two replicas serving the tiny causal LM (registry/demo_lm.py; greedy
decoding makes its gibberish deterministic), standalone gateways on both transports (the
lean HTTP/1.1 server and `--http uvicorn`, the ASGI app), spoken to over real sockets.
What is tested is the pass-through: the same answers as straight from the replica, the
first chunk out long before the end, a hang-up that frees the replica's slot, retries
before the head only, an error (never a clean end) when a replica dies mid-stream, and
leases held for the whole stream so streams spread over replicas by running sequences.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from registry.demo_lm import cached_tiny_lm_archive
from serving.gateway.filesource import write_table
from serving.gateway.node_tls import key_pin_of
from serving.gateway.routes import ReplicaRoute, VersionInfo
from serving.replica.generation_runner import TEXT_SIGNATURE
from tests.certs import certificate, new_key, pem
from tests.gateway_helpers import (
    BEARER,
    StandaloneGateway,
    deployment,
    metric_value,
    replica_route,
    table,
    wait_for,
)
from tests.replica_models import (
    KEY,
    REPO_ROOT,
    ReplicaProcess,
    free_port,
    replica_command,
    start_replica,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
NAME = "tiny"
GENERATE, STREAM = f"/v2/models/{NAME}/generate", f"/v2/models/{NAME}/generate_stream"
LM_INFO = VersionInfo("hf_causal_lm", TEXT_SIGNATURE["inputs"], TEXT_SIGNATURE["outputs"])
# Long enough that the engine is still decoding when a test acts mid-stream (hundreds of
# steps; a test that reads no further stalls the replica once the sockets' buffers are
# full), short enough for the 512-token context with any of the prompts here.
LONG = {"text_input": "The river runs", "max_tokens": 480, "ignore_eos": True}
TRANSPORTS = ["lean", "uvicorn"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return cached_tiny_lm_archive(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="module")
def replicas(tiny_lm, tmp_path_factory) -> Iterator[list[ReplicaProcess]]:
    directory = tmp_path_factory.mktemp("lm-replicas")
    started: list[ReplicaProcess] = []
    try:
        for _ in range(2):
            started.append(start_replica(directory, tiny_lm, "hf_causal_lm", TEXT_SIGNATURE,
                                         name=NAME))
        yield started
    finally:
        for replica in started:
            replica.stop()


def lm_table(*routes: Any, **options: Any) -> Any:
    return table(deployment(NAME, routes, info=LM_INFO, **options))


def start_gateway(directory: Path, routes: list[Any], transport: str,
                  **options: Any) -> StandaloneGateway:
    path = directory / f"table-{transport}-{time.monotonic_ns()}.json"
    write_table(path, lm_table(*routes, **options))
    return StandaloneGateway(path, "--http", transport)


@pytest.fixture(scope="module", params=TRANSPORTS)
def gateway(request, replicas, tmp_path_factory) -> Iterator[StandaloneGateway]:
    routes = [replica_route(replica, index + 1) for index, replica in enumerate(replicas)]
    process = start_gateway(tmp_path_factory.mktemp("gw"), routes, request.param,
                            policy="least_outstanding")
    yield process
    process.stop()


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers=BEARER, timeout=60)


def events_of(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))


def generation_counts(replica: ReplicaProcess) -> dict[str, int]:
    with replica.client() as direct:
        counts: dict[str, int] = direct.get("/stats").json()["generation"]
        return counts


def total(replicas: list[ReplicaProcess], count: str) -> int:
    return sum(generation_counts(replica)[count] for replica in replicas)


def gateway_metric(gateway: StandaloneGateway, name: str, **labels: str) -> float:
    return metric_value(httpx.get(f"{gateway.url}/metrics").text, name, **labels)


@pytest.mark.parametrize("path", [GENERATE, f"/v2/models/{NAME}/versions/1/generate"])
def test_generate_answers_as_the_replica_does(gateway, replicas, path):
    body = {"text_input": "Hello, world.", "max_tokens": 12, "ignore_eos": True}
    with replicas[0].client(timeout=60) as direct:
        expected = direct.post(GENERATE, json=body).json()
    with client(gateway.url) as http:
        answer = http.post(path, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == expected


@pytest.mark.parametrize("path", [STREAM, f"/v2/models/{NAME}/versions/1/generate_stream"])
def test_generate_stream_relays_the_replica_events(gateway, replicas, path):
    body = {"text_input": "A swarm is many small", "max_tokens": 20, "ignore_eos": True}
    with replicas[1].client(timeout=60) as direct:
        whole = direct.post(GENERATE, json=body).json()
    with client(gateway.url) as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("transfer-encoding") == "chunked"
        events = list(events_of(response.iter_lines()))
    assert "".join(event["text_output"] for event in events) == whole["text_output"]
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"] == whole["usage"]


def test_the_first_chunk_leaves_long_before_the_end(gateway, replicas):
    started_s = time.monotonic()
    with client(gateway.url) as http, http.stream("POST", STREAM, json=LONG) as response:
        lines = response.iter_lines()
        first = next(events_of(lines))
        first_s = time.monotonic() - started_s
        # In our hands while the replica still decodes the rest.
        assert total(replicas, "running") >= 1
        rest = list(events_of(lines))
    total_s = time.monotonic() - started_s
    assert "finish_reason" not in first
    assert rest[-1]["usage"]["completion_tokens"] == LONG["max_tokens"]
    assert first_s < total_s / 4, (first_s, total_s)
    assert gateway_metric(gateway, "swarm_gateway_time_to_first_token_seconds_count",
                          model=NAME) >= 1


def test_a_client_hang_up_mid_stream_cancels_the_sequence(gateway, replicas):
    cancelled_before = total(replicas, "cancelled")
    with client(gateway.url) as http, http.stream("POST", STREAM, json=LONG) as response:
        events = events_of(response.iter_lines())  # kept: a dropped iterator closes it
        next(events)
        assert gateway_metric(gateway, "swarm_gateway_streams_in_flight", model=NAME) == 1
    # The client's connection is closed: the gateway closes the replica's, which cancels.
    wait_for(lambda: total(replicas, "cancelled") > cancelled_before,
             "the replica to cancel the sequence")
    wait_for(lambda: total(replicas, "running") == 0, "the running batch to empty")
    wait_for(lambda: gateway_metric(gateway, "swarm_gateway_in_flight", model=NAME) == 0,
             "the gateway's lease to be released")
    assert gateway_metric(gateway, "swarm_gateway_streams_in_flight", model=NAME) == 0
    assert gateway_metric(gateway, "swarm_gateway_cancelled_total", model=NAME) >= 1


def spread_of_streams(gateway: StandaloneGateway, replicas: list[ReplicaProcess],
                      streams: int) -> tuple[list[int], list[float]]:
    """Open `streams` long streams one by one, each once the one before has its first
    event (so every choice sees the streams before it as running), and return the
    sequences running on each replica and the gateway's in-flight count per replica."""
    with client(gateway.url) as http:
        opened, readers = [], []
        try:
            for _ in range(streams):
                response = http.send(http.build_request("POST", STREAM, json=LONG),
                                     stream=True)
                opened.append(response)
                readers.append(events_of(response.iter_lines()))  # kept open
                next(readers[-1])
            running = [generation_counts(replica)["running"] for replica in replicas]
            in_flight = [gateway_metric(gateway, "swarm_gateway_replica_in_flight",
                                        model=NAME, replica=str(index + 1))
                         for index in range(len(replicas))]
        finally:
            for response in opened:
                response.close()
    wait_for(lambda: total(replicas, "running") == 0, "the hung-up streams to be cancelled")
    return running, in_flight


def test_streams_hold_their_replica_so_they_spread_evenly(gateway, replicas):
    """Were leases released at the head, least-outstanding would see every replica idle
    at every choice, and the spread would be chance."""
    running, in_flight = spread_of_streams(gateway, replicas, 6)
    assert running == [3, 3]
    assert in_flight == [3, 3]


def test_p2c_spreads_streams_by_running_sequences_too(replicas, tmp_path):
    routes = [replica_route(replica, index + 1) for index, replica in enumerate(replicas)]
    gateway = start_gateway(tmp_path, routes, "lean")  # the default policy: p2c_ewma
    short = {"text_input": "Hello", "max_tokens": 2}
    try:
        with client(gateway.url) as http:  # latency samples on both: estimates settle
            for _ in range(10):
                assert http.post(STREAM, json=short).status_code == 200
        running, in_flight = spread_of_streams(gateway, replicas, 6)
    finally:
        gateway.stop()
    # p2c prices (outstanding + 1) x latency: close latencies leave it to the counts.
    assert sum(running) == 6 and min(running) >= 1, running  # p2c draws: both, not evenly
    assert in_flight == running


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_dead_replica_before_the_head_is_retried_elsewhere(replicas, tmp_path, transport):
    dead = replica_route(free_port(), 9)  # nothing listens there: connect refused
    gateway = start_gateway(tmp_path, [dead, replica_route(replicas[0], 1)], transport,
                            policy="round_robin")
    body = {"text_input": "What is a token?", "max_tokens": 8, "ignore_eos": True}
    try:
        with client(gateway.url) as http:
            for _ in range(4):
                with http.stream("POST", STREAM, json=body) as response:
                    assert response.status_code == 200
                    events = list(events_of(response.iter_lines()))
                assert events[-1]["finish_reason"] == "length"
        assert gateway_metric(gateway, "swarm_gateway_retries_total", model=NAME) >= 1
    finally:
        gateway.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_replica_dying_mid_stream_is_an_error_for_the_client(tiny_lm, tmp_path, transport):
    doomed = start_replica(tmp_path, tiny_lm, "hf_causal_lm", TEXT_SIGNATURE, name=NAME)
    gateway = start_gateway(tmp_path, [replica_route(doomed, 1)], transport)
    try:
        with client(gateway.url) as http, http.stream("POST", STREAM, json=LONG) as response:
            lines = response.iter_lines()
            next(events_of(lines))
            doomed.process.send_signal(signal.SIGKILL)
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in lines:
                    pass
        wait_for(lambda: gateway_metric(gateway, "swarm_gateway_in_flight", model=NAME) == 0,
                 "the lease to be released")
        assert gateway_metric(gateway, "nv_inference_request_failure_total",
                              model=NAME) == 1
        assert gateway_metric(gateway, "swarm_gateway_streams_in_flight", model=NAME) == 0
    finally:
        gateway.stop()
        doomed.stop()


def test_a_stream_from_a_tls_replica_relays_and_its_connection_serves_again(tiny_lm,
                                                                            tmp_path):
    """Direct mode is TLS: the stream's exchange takes over a TLS transport and gives it
    back to the pool, where the next requests (stream and plain) reuse it."""
    ca_key = new_key()
    ca = certificate(ca_key.public_key(), ca_key, "node CA", ca=True)
    node_key = new_key()
    node_cert = certificate(node_key.public_key(), ca_key, "node", issuer=ca.subject,
                            sans=["127.0.0.1"], server_auth=True)
    cert_path, key_path = tmp_path / "node.pem", tmp_path / "node.key"
    cert_path.write_text(pem(node_cert))
    key_path.write_bytes(node_key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    signature = tmp_path / "signature.json"
    signature.write_text(json.dumps(TEXT_SIGNATURE))
    port = free_port()
    command = [*replica_command(tiny_lm, "hf_causal_lm", signature, port, name=NAME),
               "--tls-cert-file", str(cert_path), "--tls-key-file", str(key_path)]
    replica = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               env={**os.environ, "SWARM_REPLICA_KEY": KEY})
    gateway = None
    try:
        trust = ssl.create_default_context(cadata=pem(ca))
        with httpx.Client(verify=trust, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=5) as direct:
            wait_until(lambda: _ready(direct, port), 60, "the TLS replica to be ready")
        pin = key_pin_of(node_cert.public_bytes(serialization.Encoding.DER))
        route = ReplicaRoute(1, "127.0.0.1", port, KEY, 1, tls_sha256=pin)
        path = tmp_path / "table.json"
        write_table(path, dataclasses.replace(lm_table(route), node_ca_pem=pem(ca)))
        gateway = StandaloneGateway(path)
        body = {"text_input": "Hello, world.", "max_tokens": 10, "ignore_eos": True}
        with client(gateway.url) as http:
            whole = http.post(GENERATE, json=body).json()
            for _ in range(2):
                with http.stream("POST", STREAM, json=body) as response:
                    assert response.status_code == 200
                    events = list(events_of(response.iter_lines()))
                assert "".join(e["text_output"] for e in events) == whole["text_output"]
            assert http.post(GENERATE, json=body).json() == whole
    finally:
        if gateway is not None:
            gateway.stop()
        replica.terminate()
        replica.wait(timeout=30)


def _ready(direct: httpx.Client, port: int) -> bool:
    try:
        return direct.get(f"https://127.0.0.1:{port}/v2/health/ready").status_code == 200
    except httpx.TransportError:
        return False
