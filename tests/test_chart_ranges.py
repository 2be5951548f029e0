"""Chart time ranges (issue 15): a bounded server-side history at 5 s, 1 min and 5 min
steps, the /charts/ endpoint the pages fetch for a range, and gaps that stay gaps."""

from __future__ import annotations

from itertools import pairwise

import pytest

from dashboards import figures, history
from serving.models import Replica
from tests.cache_tools import clear_own_cache

pytestmark = pytest.mark.django_db
GPU = [{"index": 0, "utilization_pct": 40.0, "memory_used_bytes": 1}]


@pytest.fixture(autouse=True)
def fresh_history(settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                   "LOCATION": "chart-ranges"}}

    clear_own_cache()
    history._recorded_at_s.clear()
    yield
    history._recorded_at_s.clear()


def beat(node_id: int, at_s: float, completed: int = 0, replica_id: int = 1) -> None:
    history.record(node_id, at_s, GPU, [{"replica_id": replica_id, "completed": completed,
                                         "latency_p50_ms": 2.0, "latency_p99_ms": 9.0}])


def test_each_range_keeps_one_sample_per_step_and_a_fixed_count():
    start_s = 1_000_000.0
    for i in range(30 * 3600 // 5):  # 30 hours of heartbeats every 5 s
        beat(7, start_s + 5 * i, completed=10 * i)
    for name, range_ in history.RANGES.items():
        samples = history.histories([7], name)[7]
        assert len(samples) == range_.samples, name
        steps = {round(b[0] - a[0], 3) for a, b in pairwise(samples)}
        assert steps == {range_.step_s}, name
    assert history.RANGES["24h"].step_s * history.RANGES["24h"].samples >= 24 * 3600


def test_a_coarse_ring_takes_no_second_sample_from_another_process_within_a_step():
    beat(7, 5000.0)
    history._recorded_at_s.clear()  # another portal process: its own throttle is empty
    beat(7, 5030.0)
    assert len(history.histories([7], "1h")[7]) == 1
    assert len(history.histories([7], "5m")[7]) == 2


def test_a_coarse_rate_is_the_mean_over_its_step():
    for i in range(0, 121):  # 10 min at 5 s; 6 requests/s throughout
        beat(7, 6000.0 + 5 * i, completed=30 * i)
    series = figures.fleet_series(history.histories([7], "1h"), 60.0).to_dict()
    assert series["rps"][1:] == [6.0] * (len(series["t"]) - 1)


def test_a_silent_stretch_stays_a_gap_in_a_longer_range():
    for i in range(10):
        beat(7, 10_000.0 + 60 * i, completed=60 * i)
    for i in range(10):  # silent for 20 min, then back
        beat(7, 11_740.0 + 60 * i, completed=600 + 60 * i)
    series = figures.fleet_series(history.histories([7], "1h"), 60.0).to_dict()
    after_gap = series["t"].index(11_760.0)
    assert series["rps"][after_gap] is None  # no rate made up across the 20 min
    assert series["rps"][after_gap + 1] == 1.0


def test_forget_drops_every_range():
    beat(7, 5000.0)
    history.forget(7)
    assert all(history.histories([7], name) == {} for name in history.RANGES)


def charts(client, **params):
    return client.get("/charts/", params)


def test_the_endpoint_serves_each_range_and_refuses_bad_choices(client, viewer, gpu_node):
    client.force_login(viewer)
    for i in range(6):
        beat(gpu_node.pk, 20_000.0 + 60 * i)
    body = charts(client, chart="nodes", range="1h").json()
    assert body["range"] == "1h" and body["step_s"] == 60.0 and body["window_s"] == 3720.0
    assert len(body["series"][str(gpu_node.pk)]["t"]) == 6
    assert len(charts(client, chart="fleet", range="24h").json()["series"]["t"]) == 2
    for params in ({"chart": "fleet", "range": "7d"}, {"chart": "nope", "range": "1h"}, {}):
        response = charts(client, **params)
        assert response.status_code == 400 and "range" in response.json()["error"], params
    response = charts(client, chart="deployment", range="1h", deployment="ghost")
    assert response.status_code == 404 and "ghost" in response.json()["error"]


def test_the_deployment_range_counts_replicas_stopped_since(client, viewer, served_deployment):
    replica = Replica.objects.get()
    node_id = replica.node_id
    for i in range(5):
        beat(node_id, 30_000.0 + 60 * i, completed=120 * i, replica_id=replica.pk)
    Replica.objects.filter(pk=replica.pk).update(state="stopped")
    client.force_login(viewer)
    series = charts(client, chart="deployment", range="1h", deployment="mlp").json()["series"]
    assert series["rps"] == [2.0] * 4 and series["p99_ms"] == [9.0] * 4


def test_anonymous_requests_get_nothing_and_grow_nothing(client, gpu_node):
    response = charts(client, chart="fleet", range="1h")
    assert response.status_code in (302, 403)
    assert history.histories([gpu_node.pk], "1h") == {}
