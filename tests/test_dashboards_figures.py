"""Chart figures from heartbeat samples: rates from counters, restarts, sums per deployment."""

from __future__ import annotations

import pytest

from dashboards import figures, history


def sample(at_s, replicas, utils=(50.0,)):
    return history.compact(
        at_s, [{"index": i, "utilization_pct": u} for i, u in enumerate(utils)],
        [{"replica_id": rid, "completed": c, "failed": f, "latency_p50_ms": p50,
          "latency_p99_ms": p99} for rid, c, f, p50, p99 in replicas])


def test_rates_are_counter_differences_over_time():
    rates = figures.replica_rates(sample(100, [(1, 100, 0, 2.0, 9.0)]),
                                  sample(105, [(1, 150, 5, 3.0, 12.0)]))
    assert rates[1].requests_per_s == pytest.approx(10.0)
    assert rates[1].errors_per_s == pytest.approx(1.0)
    assert (rates[1].latency_p50_ms, rates[1].latency_p99_ms) == (3.0, 12.0)


def test_a_restarted_replica_and_a_new_one_give_no_rate():
    rates = figures.replica_rates(sample(100, [(1, 100, 0, 1, 1)]),
                                  sample(105, [(1, 3, 0, 1, 1), (2, 50, 0, 1, 1)]))
    assert rates == {}


def test_deployment_series_sum_replicas_on_different_nodes():
    histories = {
        1: [sample(100, [(10, 0, 0, None, None)]), sample(105, [(10, 50, 0, 2.0, 8.0)])],
        2: [sample(100, [(20, 0, 0, None, None)]), sample(105, [(20, 150, 10, 4.0, 20.0)])],
    }
    series = figures.deployment_series(histories, {10: 7, 20: 7}, step_s=5.0)[7]
    assert series.t_s == [105.0]
    assert series.lines["rps"] == [pytest.approx(40.0)]
    assert series.lines["p50_ms"] == [pytest.approx(3.5)]  # weighted by requests: (10*2+30*4)/40
    assert series.lines["p99_ms"] == [20.0]
    assert series.lines["error_rate"] == [pytest.approx(2 / 42, abs=1e-4)]


def test_fleet_series_averages_devices_and_sums_requests():
    histories = {1: [sample(100, [(1, 0, 0, None, None)], (20.0, 40.0)),
                     sample(105, [(1, 25, 0, None, None)], (60.0, 80.0))]}
    series = figures.fleet_series(histories, 5.0).to_dict()
    # No rate before the second sample: none, not a made-up 0.
    assert series == {"t": [100.0, 105.0], "util_pct": [30.0, 70.0], "rps": [None, 5.0]}


def test_history_keeps_one_sample_per_step_and_a_bounded_count(settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    history._recorded_at_s.clear()
    for i in range(history.HISTORY_SAMPLES * 2 * 5):
        history.record(9, 1000.0 + i, [{"index": 0, "utilization_pct": 1.0}], [])
    samples = history.histories([9])[9]
    assert len(samples) == history.HISTORY_SAMPLES
    assert samples[1][0] - samples[0][0] == history.HISTORY_STEP_S
