"""The engine in-process, with a fake runner: batching, splitting and failure isolation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.replica.batching import BatchPolicy
from serving.replica.engine import InferenceEngine
from serving.replica.runner import ModelFailure
from serving.replica.stats import ReplicaStats
from swarm_protocol.signature import parse_signature

POISON = -1.0


class DoublingRunner:
    """Returns 2x its input; raises when any row holds POISON; records batch sizes."""

    def __init__(self, fixed_batch: bool = False) -> None:
        dim0 = 1 if fixed_batch else -1
        self.signature = parse_signature({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [dim0, 2]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [dim0, 2]}]})
        self.batch_rows: list[int] = []

    def load(self, warm_up_rows: int) -> None:
        pass

    def forward(self, arrays):
        (x,) = arrays
        self.batch_rows.append(len(x))
        if (x == POISON).any():
            raise ModelFailure("poisoned row")
        return [x * 2]


def rows(*values: float) -> tuple[np.ndarray, ...]:
    return (np.array([[v, v] for v in values], dtype=np.float32),)


async def run_all(engine: InferenceEngine, requests: list[tuple[np.ndarray, ...]]):
    await engine.load()
    try:
        return await asyncio.gather(*(engine.infer(r, len(r[0])) for r in requests),
                                    return_exceptions=True)
    finally:
        engine.stop()


async def test_requests_that_arrive_while_the_model_runs_share_the_next_forward_pass():
    runner = DoublingRunner()
    engine = InferenceEngine(runner, BatchPolicy(8, 2.0), ReplicaStats())
    results = await run_all(engine, [rows(1), rows(2, 3), rows(4), rows(5)])
    assert runner.batch_rows == [1, 4]  # the first ran at once, the rest waited for it
    assert [r[0].tolist() for r in results] == [[[2, 2]], [[4, 4], [6, 6]], [[8, 8]],
                                                 [[10, 10]]]
    assert (engine.stats.batches, engine.stats.batched_rows) == (2, 5)


async def test_a_failing_request_fails_alone_and_its_batch_mates_are_rerun():
    runner = DoublingRunner()
    engine = InferenceEngine(runner, BatchPolicy(8, 2.0), ReplicaStats())
    results = await run_all(engine, [rows(1), rows(2), rows(POISON), rows(3)])
    assert isinstance(results[2], ModelFailure)
    assert [results[i][0][0, 0] for i in (0, 1, 3)] == [2, 4, 6]
    assert runner.batch_rows == [1, 3, 1, 1, 1]  # the batch of 3 failed, then one by one


async def test_a_signature_with_a_fixed_batch_dimension_is_never_batched():
    runner = DoublingRunner(fixed_batch=True)
    engine = InferenceEngine(runner, BatchPolicy(8, 2.0), ReplicaStats())
    await run_all(engine, [rows(1), rows(2), rows(3)])
    assert runner.batch_rows == [1, 1, 1]


@pytest.mark.parametrize("max_batch_size", [1, 2])
async def test_max_batch_size_caps_the_rows_of_each_forward_pass(max_batch_size):
    runner = DoublingRunner()
    engine = InferenceEngine(runner, BatchPolicy(max_batch_size, 0.0), ReplicaStats())
    await run_all(engine, [rows(v) for v in range(1, 6)])
    assert max(runner.batch_rows) == max_batch_size
    assert sum(runner.batch_rows) == 5
