"""The pure batcher and the stats window, driven with an injected clock."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from serving.replica.batching import Batcher, BatchPolicy, select_batch
from serving.replica.stats import ReplicaStats, percentile
from tests.replica_models import REPO_ROOT


@dataclass(frozen=True)
class Req:
    name: str
    rows: int = 1
    shape_key: tuple[int, ...] = (4,)


class FakeClock:
    def __init__(self) -> None:
        self.now_ms = 0.0

    def advance(self, ms: float) -> float:
        self.now_ms += ms
        return self.now_ms


def names(batch) -> list[str]:
    return [item.name for item in batch.items]


def make_batcher(max_batch_size: int = 8, max_queue_delay_ms: float = 2.0) -> Batcher[Req]:
    return Batcher(BatchPolicy(max_batch_size, max_queue_delay_ms))


def test_an_idle_model_runs_a_lone_request_at_once():
    clock, batcher = FakeClock(), make_batcher()
    batcher.enqueue(Req("a"), clock.now_ms)
    batch = batcher.next_batch(clock.now_ms)
    assert batch is not None and names(batch) == ["a"]
    assert batch.queue_wait_ms == 0.0
    assert batcher.busy


def test_nothing_runs_while_the_model_is_busy_and_arrivals_accumulate():
    clock, batcher = FakeClock(), make_batcher()
    batcher.enqueue(Req("a"), clock.now_ms)
    batcher.next_batch(clock.now_ms)
    for name in "bcd":
        batcher.enqueue(Req(name), clock.advance(1.0))
        assert batcher.next_batch(clock.now_ms) is None
    assert batcher.queue_depth == 3


def test_the_next_batch_takes_the_accumulated_requests_as_soon_as_the_model_is_free():
    clock, batcher = FakeClock(), make_batcher()
    batcher.enqueue(Req("a"), clock.now_ms)
    batcher.next_batch(clock.now_ms)
    for name in "bcd":
        batcher.enqueue(Req(name), clock.advance(1.0))
    clock.advance(5.0)
    batcher.batch_done()
    batch = batcher.next_batch(clock.now_ms)
    assert batch is not None and names(batch) == ["b", "c", "d"]
    assert batch.rows == 3
    assert batch.queue_wait_ms == pytest.approx(7.0)  # b arrived at 1 ms, runs at 8 ms
    assert batcher.queue_depth == 0


def test_a_batch_stops_at_max_batch_size_rows_and_the_rest_waits_in_order():
    clock, batcher = FakeClock(), make_batcher(max_batch_size=4)
    batcher.enqueue(Req("busy"), clock.now_ms)
    batcher.next_batch(clock.now_ms)
    for index, rows in enumerate([2, 1, 3, 1]):
        batcher.enqueue(Req(f"r{index}", rows=rows), clock.now_ms)
    batcher.batch_done()
    first = batcher.next_batch(clock.now_ms)
    # r2 (3 rows) does not fit after 3 rows; r3 (1 row) does.
    assert first is not None and names(first) == ["r0", "r1", "r3"] and first.rows == 4
    batcher.batch_done()
    second = batcher.next_batch(clock.now_ms)
    assert second is not None and names(second) == ["r2"]


def test_a_request_larger_than_max_batch_size_runs_alone():
    batcher = make_batcher(max_batch_size=4)
    batcher.enqueue(Req("big", rows=10), 0.0)
    batcher.enqueue(Req("small"), 0.0)
    batch = batcher.next_batch(0.0)
    assert batch is not None and names(batch) == ["big"] and batch.rows == 10
    batcher.batch_done()
    assert names(batcher.next_batch(0.0)) == ["small"]


def test_max_batch_size_one_means_one_request_per_forward_pass():
    batcher = make_batcher(max_batch_size=1)
    for name in "abc":
        batcher.enqueue(Req(name), 0.0)
    seen = []
    while (batch := batcher.next_batch(0.0)) is not None:
        seen.append(names(batch))
        batcher.batch_done()
    assert seen == [["a"], ["b"], ["c"]]


def test_requests_with_different_non_batch_shapes_never_share_a_batch():
    queue = [Req("a", shape_key=(5,)), Req("b", shape_key=(7,)), Req("c", shape_key=(5,))]
    assert select_batch(queue, 8) == (0, 2)
    assert select_batch([], 8) == ()


def test_drain_queue_hands_back_every_waiting_request():
    batcher = make_batcher()
    for name in "ab":
        batcher.enqueue(Req(name), 0.0)
    assert [item.name for item in batcher.drain_queue()] == ["a", "b"]
    assert batcher.queue_depth == 0 and batcher.next_batch(0.0) is None


@pytest.mark.parametrize(("max_batch_size", "delay_ms"), [(0, 1.0), (4, -1.0)])
def test_a_policy_refuses_nonsense(max_batch_size, delay_ms):
    with pytest.raises(ValueError, match="max_"):
        BatchPolicy(max_batch_size, delay_ms)


def test_stats_count_totals_and_report_recent_latency_percentiles():
    stats = ReplicaStats(window_requests=100, window_s=60.0)
    for index in range(1, 101):
        stats.record_success(now_s=10.0, latency_ms=float(index))
    stats.record_failure()
    stats.record_batch(rows=5)
    snapshot = stats.snapshot(now_s=11.0, state="ready", in_flight=2, queue_depth=1)
    assert snapshot == {
        "state": "ready", "in_flight": 2, "queue_depth": 1, "completed": 100, "failed": 1,
        "latency_p50_ms": 50.0, "latency_p99_ms": 99.0, "batches": 1, "batched_rows": 5,
    }


def test_stats_forget_latencies_older_than_the_window():
    stats = ReplicaStats(window_requests=3, window_s=60.0)
    for now_s, latency_ms in [(0.0, 100.0), (1.0, 1.0), (2.0, 2.0), (3.0, 3.0)]:
        stats.record_success(now_s, latency_ms)
    assert stats.recent_latencies_ms(now_s=3.0) == [1.0, 2.0, 3.0]  # count window
    assert stats.recent_latencies_ms(now_s=62.5) == [3.0]  # time window
    snapshot = stats.snapshot(now_s=200.0, state="ready", in_flight=0, queue_depth=0)
    assert snapshot["latency_p50_ms"] is None and snapshot["completed"] == 4


def test_percentile_is_nearest_rank():
    assert percentile([1.0], 0.99) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0


def test_the_replica_modules_import_neither_django_nor_torch_where_pure():
    code = ("import sys; import serving.replica.batching, serving.replica.stats, "
            "serving.replica.codec; "
            "assert 'torch' not in sys.modules, 'torch'; "
            "import serving.replica.server; "
            "assert not any(m == 'django' or m.startswith('django.') for m in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
