"""The asyncio side of the dynamic batcher: queue requests, run batches in the model thread.

The event loop owns all state (batcher, stats); the worker thread only runs forward
passes and hands results back with `call_soon_threadsafe`, so nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np

from serving.replica.batching import Batch, Batcher, BatchPolicy
from serving.replica.runner import ModelFailure, is_batchable
from serving.replica.stats import ReplicaStats
from swarm_protocol.signature import Signature

R = TypeVar("R")
Outputs = list[np.ndarray]
Result = Outputs | ModelFailure


class Runner(Protocol):
    """What the engine needs of a model runner (runner.py, or pipeline.py's steps)."""

    @property
    def signature(self) -> Signature: ...

    def load(self, warm_up_rows: int) -> None: ...

    def forward(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]: ...


@dataclass(eq=False)
class PendingRequest:
    """One admitted request waiting for its rows to run."""

    arrays: tuple[np.ndarray, ...]
    rows: int
    shape_key: Hashable
    future: asyncio.Future[Outputs]


class ModelWorker:
    """The one thread that touches the model."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` in the worker thread, after the jobs already submitted."""
        self._jobs.put(job)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Let the submitted jobs finish, then end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


def _now_ms() -> float:
    return time.monotonic() * 1000.0


class InferenceEngine:
    """Admits requests, batches them, and resolves each with its own rows of the outputs."""

    def __init__(self, runner: Runner, policy: BatchPolicy, stats: ReplicaStats) -> None:
        if not is_batchable(runner.signature):
            policy = BatchPolicy(max_batch_size=1, max_queue_delay_ms=policy.max_queue_delay_ms)
        self.runner = runner
        self.stats = stats
        self._batcher: Batcher[PendingRequest] = Batcher(policy)
        self._worker = ModelWorker()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queue_depth(self) -> int:
        """Return how many admitted requests wait for the model."""
        return self._batcher.queue_depth

    async def load(self) -> None:
        """Load the model and warm it up in the worker thread (raises LoadError)."""
        self._loop = asyncio.get_running_loop()
        self._worker.start()
        await self._in_worker(partial(self.runner.load, self._batcher.policy.max_batch_size))

    def stop(self) -> None:
        """End the worker thread once its queued jobs are done."""
        self._worker.stop()

    async def infer(self, arrays: tuple[np.ndarray, ...], rows: int) -> Outputs:
        """Return the outputs (signature order) for one request; raises ModelFailure."""
        assert self._loop is not None, "load() must run first"
        future: asyncio.Future[Outputs] = self._loop.create_future()
        shape_key = tuple(array.shape[1:] for array in arrays)
        self._batcher.enqueue(PendingRequest(arrays, rows, shape_key, future), _now_ms())
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        batch = self._batcher.next_batch(_now_ms())
        if batch is not None:
            self._worker.submit(partial(self._run_batch, batch))

    def _run_batch(self, batch: Batch[PendingRequest]) -> None:
        """Worker thread: run one batch and post the results back to the loop."""
        results = self._forward_isolated(batch)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._finish, batch, results)

    def _forward_isolated(self, batch: Batch[PendingRequest]) -> list[Result]:
        """Return one result per request; a failed batch is retried request by request so
        that one request the model rejects (an id out of range) fails alone."""
        try:
            return list(self._forward(batch.items, batch.rows))
        except ModelFailure as exc:
            if len(batch.items) == 1:
                return [exc]
        results: list[Result] = []
        for item in batch.items:
            try:
                results.extend(self._forward((item,), item.rows))
            except ModelFailure as exc:
                results.append(exc)
        return results

    def _forward(self, items: tuple[PendingRequest, ...], rows: int) -> list[Outputs]:
        try:
            if len(items) == 1:
                return [self.runner.forward(items[0].arrays)]
            arrays = [np.concatenate([item.arrays[i] for item in items])
                      for i in range(len(items[0].arrays))]
            # Object (BYTES) arrays concatenate like numbers: rows stay rows.
            return _split_rows(self.runner.forward(arrays), items, rows, self.runner)
        except ModelFailure:
            raise
        except Exception as exc:  # a bug of ours must not leave requests hanging
            raise ModelFailure(f"{type(exc).__name__}: {exc}") from exc

    def _finish(self, batch: Batch[PendingRequest], results: list[Result]) -> None:
        self._batcher.batch_done()
        self.stats.record_batch(batch.rows)
        for item, result in zip(batch.items, results, strict=True):
            if item.future.done():  # the caller went away
                continue
            if isinstance(result, ModelFailure):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        self._dispatch()

    async def _in_worker(self, function: Callable[[], R]) -> R:
        assert self._loop is not None
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()

        def job() -> None:
            try:
                value = function()
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_settle_result, future, value)

        self._worker.submit(job)
        result: R = await future
        return result


def _split_rows(outputs: Outputs, items: tuple[PendingRequest, ...], rows: int,
                runner: Runner) -> list[Outputs]:
    """Return each request's rows of the batch outputs (views, no copies)."""
    for output, spec in zip(outputs, runner.signature.outputs, strict=True):
        if output.shape[0] != rows:
            raise ModelFailure(f"output {spec.name!r} has {output.shape[0]} rows for a "
                               f"batch of {rows}")
    split: list[Outputs] = []
    start = 0
    for item in items:
        split.append([output[start:start + item.rows] for output in outputs])
        start += item.rows
    return split


def _settle_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _settle_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
