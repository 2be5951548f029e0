"""One /metrics for several gateway processes (serving/gateway/metrics_share.py).

Fast: real GatewayMetrics registries and real files in a temporary directory, the clock
passed in. Slow: two `swarm-gateway` processes on one port (`--reuse-port`) with one
`--metrics-dir`, in front of a real portal and replica; every scrape, whichever process
answers it, counts every request.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.gateway import metrics_share
from serving.gateway.metrics import GatewayMetrics, LiveDeployment, LiveReplica
from serving.gateway.metrics_share import (
    GAUGE_FRESH_S,
    MAX_SNAPSHOT_BYTES,
    MAX_SNAPSHOT_FILES,
    SharedMetrics,
    SnapshotWriter,
)
from serving.gateway.service import parse_args
from tests import test_gateway_service
from tests.conftest import free_port
from tests.gateway_helpers import eventually
from tests.live import LiveGateway, create_gateway_token
from tests.test_gateway_portal import ROW
from tests.waiting import wait_until

NOW_S = 1_800_000_000.0
SUCCESS = "nv_inference_request_success_total"
stack = test_gateway_service.stack  # the portal, a ready replica of `mlp` and an API key

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: bytes | str) -> Samples:
    """Return every sample of a Prometheus text exposition (parsed strictly)."""
    text = text.decode() if isinstance(text, bytes) else text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(scraped: Samples, name: str, **labels: str) -> float:
    """Return the sum of the samples called `name` that carry `labels` (0.0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in scraped.items() if n == name and wanted <= have)


def gateway_metrics(in_flight: int = 0, queued: int = 0, ejected: bool = False
                    ) -> GatewayMetrics:
    """Return a process's metrics whose balancer shows `in_flight` on one replica of m."""
    replica = LiveReplica(7, "127.0.0.1:9000", 1, in_flight, ejected)
    return GatewayMetrics(True, lambda: [LiveDeployment("m", queued, (replica,))])


def serve(metrics: GatewayMetrics, successes: int, duration_s: float = 0.01) -> None:
    """Count `successes` requests of m v1 that took `duration_s` each."""
    for _ in range(successes):
        metrics.for_version("m", 1).observe(200, duration_s)


def share(directory: Path, instance: str, metrics: GatewayMetrics,
          now_s: float = NOW_S) -> SharedMetrics:
    """Return the process's side of `directory`, installed as its /metrics renderer."""
    shared = SharedMetrics(directory, instance, clock_s=lambda: now_s)
    metrics.renderer = shared.render
    return shared


def write_snapshot(directory: Path, instance: str, metrics: GatewayMetrics,
                   written_s: float = NOW_S) -> None:
    shared = SharedMetrics(directory, instance, clock_s=lambda: written_s)
    assert shared.write(*shared.snapshot(metrics.registry))


# -- fast ----------------------------------------------------------------------------------

def test_a_scrape_sums_its_own_live_figures_and_the_other_snapshots(tmp_path):
    here, there = gateway_metrics(in_flight=2, queued=1), gateway_metrics(in_flight=3)
    serve(here, 4, duration_s=0.003)
    serve(there, 6, duration_s=0.2)
    here.retried("m")
    there.retried("m")
    there.rejected("m", 429)
    write_snapshot(tmp_path, "there", there)
    share(tmp_path, "here", here)

    scraped = samples(here.render())
    assert value(scraped, SUCCESS, model="m", version="1") == 10
    assert value(scraped, "nv_inference_request_duration_seconds_count", model="m") == 10
    assert value(scraped, "nv_inference_request_duration_seconds_bucket", le="0.005") == 4
    assert value(scraped, "nv_inference_request_duration_seconds_bucket", le="+Inf") == 10
    assert value(scraped, "nv_inference_request_duration_seconds_sum") == pytest.approx(1.212)
    assert value(scraped, "swarm_gateway_retries_total", model="m") == 2
    assert value(scraped, "swarm_gateway_rejections_total", code="429") == 1
    assert value(scraped, "swarm_gateway_in_flight", model="m") == 5
    assert value(scraped, "swarm_gateway_replica_in_flight", replica="7") == 5
    assert value(scraped, "swarm_gateway_queue_depth", model="m") == 1


def test_alone_in_its_directory_a_process_renders_what_it_did_without_one(tmp_path):
    metrics = gateway_metrics(in_flight=1)
    serve(metrics, 3)
    metrics.ejected("m")
    plain = metrics.render()
    share(tmp_path, "only", metrics)
    write_snapshot(tmp_path, "only", gateway_metrics())  # its own file is not read
    assert metrics.render() == plain


def test_no_counter_goes_back_when_the_next_scrape_lands_on_the_other_process(tmp_path):
    first, second = gateway_metrics(), gateway_metrics()
    serve(first, 3)
    serve(second, 2)
    share(tmp_path, "first", first)
    share(tmp_path, "second", second)
    assert value(samples(first.render()), SUCCESS) == 3  # second has written nothing yet
    serve(second, 1)
    assert value(samples(second.render()), SUCCESS) == 6  # first's file came with its scrape
    assert value(samples(first.render()), SUCCESS) == 6


def test_frozen_figures_collect_as_the_registry_did_when_they_were_taken():
    metrics = gateway_metrics(in_flight=2, queued=1, ejected=True)
    serve(metrics, 3)
    metrics.retried("m")
    metrics.rejected("m", 429)
    metrics.cancelled("m")
    metrics.ejected("m")
    frozen = metrics.frozen()
    then = generate_latest(metrics.registry)
    serve(metrics, 2)
    metrics.retried("m")
    assert generate_latest(frozen) == then  # type: ignore[arg-type]


def test_an_older_snapshot_never_replaces_a_newer_one(tmp_path):
    metrics = gateway_metrics()
    shared = SharedMetrics(tmp_path, "g", clock_s=lambda: NOW_S)
    older = shared.snapshot(metrics.registry)
    serve(metrics, 1)
    assert shared.write(*shared.snapshot(metrics.registry))
    assert shared.write(*older)  # the periodic thread finishing after a scrape's write
    written = metrics_share.decode((tmp_path / "g.json").read_bytes())
    assert sum(v for f in written.families for n, _, v in f.samples if n == SUCCESS) == 1


def test_gauges_of_a_stale_snapshot_are_dropped_but_its_counters_stay(tmp_path):
    here, gone = gateway_metrics(in_flight=1), gateway_metrics(in_flight=9, queued=4)
    serve(gone, 5)
    write_snapshot(tmp_path, "gone", gone, written_s=NOW_S - GAUGE_FRESH_S - 1)
    share(tmp_path, "here", here)
    scraped = samples(here.render())
    assert value(scraped, SUCCESS, model="m") == 5  # cumulative: a stopped process's count
    assert value(scraped, "swarm_gateway_in_flight", model="m") == 1
    assert value(scraped, "swarm_gateway_queue_depth", model="m") == 0

    share(tmp_path, "here", here, now_s=NOW_S - GAUGE_FRESH_S)  # while it was fresh
    assert value(samples(here.render()), "swarm_gateway_in_flight", model="m") == 10


def test_a_process_restarted_under_its_instance_id_counts_on_from_its_file(tmp_path):
    before = gateway_metrics(in_flight=9)
    serve(before, 5)
    before.retried("m")
    write_snapshot(tmp_path, "g-1", before)
    after = gateway_metrics(in_flight=1)  # a new process, same id, a second later
    serve(after, 2)
    share(tmp_path, "g-1", after, now_s=NOW_S + 1)
    scraped = samples(after.render())
    assert value(scraped, SUCCESS, model="m") == 7
    assert value(scraped, "nv_inference_request_duration_seconds_count") == 7
    assert value(scraped, "swarm_gateway_retries_total") == 1
    assert value(scraped, "swarm_gateway_in_flight") == 1  # the old run's gauges are gone
    written = metrics_share.decode((tmp_path / "g-1.json").read_bytes())
    assert sum(v for f in written.families for n, _, v in f.samples if n == SUCCESS) == 7


def test_the_ejected_flag_is_one_while_any_process_ejects_the_replica(tmp_path):
    here = gateway_metrics(ejected=True)
    for name in ("a", "b"):
        write_snapshot(tmp_path, name, gateway_metrics(ejected=True))
    share(tmp_path, "here", here)
    assert value(samples(here.render()), "swarm_gateway_replica_ejected", replica="7") == 1


def test_malformed_and_oversized_snapshots_are_skipped_with_one_warning_each(tmp_path,
                                                                             caplog):
    here, good = gateway_metrics(), gateway_metrics()
    serve(here, 1)
    serve(good, 2)
    write_snapshot(tmp_path, "good", good)
    (tmp_path / "garbage.json").write_bytes(b"{not json")
    (tmp_path / "deep.json").write_bytes(b"[" * 200_000)
    (tmp_path / "other.json").write_text(json.dumps({"format": 1, "instance": "x"}))
    injected = json.loads((tmp_path / "good.json").read_text())
    injected["families"][0]["samples"][0][0] = 'nv_inference_request_success_total 1e9\n#'
    (tmp_path / "injected.json").write_text(json.dumps(injected))
    with (tmp_path / "huge.json").open("wb") as huge:
        huge.truncate(MAX_SNAPSHOT_BYTES + 1)  # sparse: the size alone refuses it
    share(tmp_path, "here", here)

    with caplog.at_level(logging.WARNING, logger=metrics_share.log.name):
        for _ in range(3):
            assert value(samples(here.render()), SUCCESS, model="m") == 3
    assert len(caplog.records) == 5
    for name in ("deep.json", "garbage.json", "huge.json", "injected.json", "other.json"):
        assert sum(name in record.getMessage() for record in caplog.records) == 1, name


def test_at_most_the_first_256_snapshots_are_summed(tmp_path, caplog):
    one = gateway_metrics()
    serve(one, 1)
    for index in range(MAX_SNAPSHOT_FILES + 4):
        write_snapshot(tmp_path, f"p{index:04d}", one)
    here = gateway_metrics()
    share(tmp_path, "here", here)
    with caplog.at_level(logging.WARNING, logger=metrics_share.log.name):
        assert value(samples(here.render()), SUCCESS) == MAX_SNAPSHOT_FILES
        here.render()
    assert len(caplog.records) == 1 and "summing the first 256" in caplog.text


def test_a_snapshot_file_is_private_and_replaced_whole(tmp_path):
    tmp_path = tmp_path / "metrics"
    tmp_path.mkdir()
    metrics = gateway_metrics()
    shared = SharedMetrics(tmp_path, "g-1", clock_s=lambda: NOW_S)
    serve(metrics, 2)
    assert shared.write(*shared.snapshot(metrics.registry))
    serve(metrics, 1)
    assert shared.write(*shared.snapshot(metrics.registry))
    assert os.listdir(tmp_path) == ["g-1.json"]  # no temporary file left behind
    assert (tmp_path / "g-1.json").stat().st_mode & 0o777 == 0o600
    written = metrics_share.decode((tmp_path / "g-1.json").read_bytes())
    assert written.instance == "g-1" and written.written_s == NOW_S
    assert dict(((n, frozenset(labels.items())), v) for f in written.families
                for n, labels, v in f.samples)[(SUCCESS, frozenset(
                    {("model", "m"), ("version", "1")}))] == 3


async def test_the_writer_writes_every_interval_and_the_final_figures_at_close(tmp_path):
    metrics = gateway_metrics()
    shared = SharedMetrics(tmp_path, "w")
    writer = SnapshotWriter(shared, metrics.frozen, every_s=0.05)
    path = tmp_path / "w.json"

    def written_successes() -> float:
        families = metrics_share.decode(path.read_bytes()).families if path.exists() else ()
        return sum(v for f in families for n, _, v in f.samples if n == SUCCESS)

    writer.start()
    try:
        serve(metrics, 2)
        await eventually(lambda: written_successes() == 2, "the periodic snapshot")
        serve(metrics, 1)
    finally:
        await writer.aclose()
    assert written_successes() == 3


def test_the_metrics_directory_is_off_unless_given():
    assert parse_args(["--portal", "http://p"]).metrics_dir is None
    assert parse_args(["--portal", "http://p", "--metrics-dir", "/d"]).metrics_dir == Path("/d")


# -- real processes ------------------------------------------------------------------------

@pytest.fixture
def sharing_pair(stack, tmp_path) -> Iterator[tuple[str, Path, list[LiveGateway]]]:
    """Two swarm-gateways on one port (SO_REUSEPORT) with one --metrics-dir."""
    portal, port, directory = stack["portal"], free_port(), tmp_path / "metrics"
    gateways = [LiveGateway(portal.url, create_gateway_token(portal.env, f"ms-{index}"),
                            "--reuse-port", "--metrics-dir", str(directory),
                            "--instance-id", f"ms-{index}", port=port,
                            portal_uds=portal.portal_uds,
                            env={"SWARM_GATEWAY_METRICS_TOKEN": "scrape-token"})
                for index in range(2)]
    try:
        for gateway in gateways:
            gateway.start()
        yield f"http://127.0.0.1:{port}", directory, gateways
    finally:
        for gateway in gateways:
            gateway.stop()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_every_scrape_counts_the_requests_both_processes_served(stack, sharing_pair):
    url, directory, gateways = sharing_pair
    requests = 40
    for _ in range(requests):  # one connection each: the kernel spreads them
        answer = httpx.post(f"{url}{test_gateway_service.INFER}", json=ROW,
                            headers=stack["headers"], timeout=30)
        assert answer.status_code == 200, answer.text

    def scrape() -> float:
        text = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer scrape-token"},
                         timeout=10).text
        return value(samples(text), SUCCESS, model="mlp")

    def own_counts() -> list[float]:
        return [sum(v for f in metrics_share.decode((directory / f"ms-{i}.json").read_bytes())
                    .families for n, labels, v in f.samples
                    if n == SUCCESS and labels["model"] == "mlp") for i in range(2)]

    wait_until(lambda: scrape() == requests, 10, f"a scrape counting {requests}")
    assert [scrape() for _ in range(10)] == [requests] * 10
    wait_until(lambda: sum(own_counts()) == requests, 10, "both snapshots up to date")
    assert min(own_counts()) > 0, own_counts()  # both processes served some
    assert {p.stat().st_mode & 0o777 for p in directory.iterdir()} == {0o600}

    gateways[0].stop()  # its last figures stay counted by the one left
    assert [scrape() for _ in range(3)] == [requests] * 3
    gateways[0].start()  # the same instance id counts on from its file
    assert [scrape() for _ in range(10)] == [requests] * 10
