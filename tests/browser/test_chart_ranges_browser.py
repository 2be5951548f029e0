"""In Chromium (issue 15): the 5 min / 1 h / 24 h choice on the overview, fleet and
deployment charts shows the server's history for that range, gaps included.

Screenshots go to $SWARM_TEST_ARTEFACTS (else var/test-artifacts/chart_ranges); the folder is
printed.
"""

from __future__ import annotations

from typing import Any

import pytest

from dashboards import history
from serving.models import Replica

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
START_S = 1_800_000_000.0
MINUTES = [*range(0, 20), *range(35, 50)]  # 15 minutes without data between


@pytest.fixture
def hour_of_history(served_deployment) -> int:
    """50 minutes of 1 min samples with a 15 min hole; returns the replica id."""
    replica = Replica.objects.get()
    history._recorded_at_s.clear()
    for n, minute in enumerate(MINUTES):
        history.record(replica.node_id, START_S + 60 * minute,
                       [{"index": 0, "kind": "gpu", "utilization_pct": 30.0 + minute}],
                       [{"replica_id": replica.pk, "completed": 120 * n, "failed": 0,
                         "latency_p50_ms": 2.0, "latency_p99_ms": 5.0}])
    return replica.pk


def choose(page: Any, picker: str, range_name: str) -> None:
    page.click(f'#{picker} button[data-range="{range_name}"]')
    page.wait_for_selector(f'#{picker}[data-state="shown"][data-range="{range_name}"]')


def drawn(page: Any, element_id: str) -> list[list[Any]]:
    return page.evaluate(f"document.getElementById('{element_id}').swarmChart.data")


def assert_gap_between(times: list[float], values: list[Any]) -> None:
    gap = values.index(None, 2)
    assert times[gap - 1] <= START_S + 60 * 19 < START_S + 60 * 35 <= times[gap + 1]


def test_the_overview_shows_the_last_hour(log_in, hour_of_history, screenshot):
    page = log_in("olga")
    page.goto("/overview/")
    choose(page, "fleet-range", "1h")
    assert page.get_attribute('#fleet-range button[data-range="1h"]', "aria-pressed") == "true"
    times, util, rps = drawn(page, "fleet-chart")
    assert len([t for t, v in zip(times, util, strict=True) if v is not None]) == len(MINUTES)
    assert_gap_between(times, util)
    assert set(v for v in rps if v is not None) == {2.0}
    screenshot(page, "overview-1h")


def test_the_fleet_and_deployment_pages_switch_ranges(log_in, hour_of_history, screenshot):
    page = log_in("olga")
    page.goto("/fleet/")
    choose(page, "fleet-range", "1h")
    node_chart = page.get_attribute("[data-chart]", "data-chart")
    times, util = page.evaluate(
        f"document.querySelector('[data-chart=\"{node_chart}\"]').swarmChart.data")
    assert max(v for v in util if v is not None) == 30.0 + MINUTES[-1]
    assert_gap_between(times, util)
    screenshot(page, "fleet-1h")
    page.goto("/deployments/mlp/")
    choose(page, "deployment-range", "24h")
    times, rps, *_ = drawn(page, "chart-rps")
    assert [v for v in rps if v is not None] and set(v for v in rps if v is not None) == {2.0}
    screenshot(page, "deployment-24h")
    choose(page, "deployment-range", "5m")  # back to live: the recent 5 s ring (empty here)
    assert drawn(page, "chart-rps")[0] == []
