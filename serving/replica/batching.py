"""Dynamic batching decisions (pure: no torch, no asyncio; the clock is passed in).

The policy is work-conserving, for one model worker:
- when the model is free and requests wait, they run at once: an idle replica adds no
  latency, and a request never waits for company while the model could be working;
- while a batch runs, arriving requests accumulate; when the model becomes free the next
  batch takes them (oldest first) up to `max_batch_size` rows;
- a request with more rows than `max_batch_size` runs alone; requests whose non-batch
  dimensions differ (variable dims other than dim 0) never share a batch.

`max_queue_delay_ms` bounds how long a queued request may be held for batching while the
model is free; this policy never holds one (holding only pays when a forward pass costs
about the same for 1 and N rows AND the model would otherwise sit idle, and at low load the
brief wants no added latency), so the bound always holds. Time spent waiting for a busy
model is reported, not decided on: `Batch.queue_wait_ms`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What the batcher needs to know about a waiting request."""

    @property
    def rows(self) -> int: ...

    @property
    def shape_key(self) -> Hashable: ...


T = TypeVar("T", bound=Queued)


@dataclass(frozen=True)
class BatchPolicy:
    """How large a batch may grow and how long a request may be held for one."""

    max_batch_size: int
    max_queue_delay_ms: float

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must not be negative")


def select_batch(queue: Sequence[Queued], max_batch_size: int) -> tuple[int, ...]:
    """Return the queue indices that form the next batch, oldest first (empty queue: ())."""
    if not queue:
        return ()
    head = queue[0]
    taken = [0]
    rows = head.rows
    for index in range(1, len(queue)):
        if rows >= max_batch_size:
            break
        item = queue[index]
        # Skipping a request that does not fit keeps FIFO for the head: the skipped one
        # becomes the head of the next batch, so nothing starves.
        if item.shape_key == head.shape_key and rows + item.rows <= max_batch_size:
            taken.append(index)
            rows += item.rows
    return tuple(taken)


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Requests to run as one forward pass."""

    items: tuple[T, ...]
    rows: int
    queue_wait_ms: float  # how long the oldest of them waited


class Batcher(Generic[T]):
    """The queue and the model's busy flag; says what to run and when."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._queue: list[T] = []
        self._enqueued_at_ms: list[float] = []
        self.busy = False

    @property
    def queue_depth(self) -> int:
        """Return how many requests wait (not counting the running batch)."""
        return len(self._queue)

    def enqueue(self, item: T, now_ms: float) -> None:
        """Add a request to the queue."""
        self._queue.append(item)
        self._enqueued_at_ms.append(now_ms)

    def next_batch(self, now_ms: float) -> Batch[T] | None:
        """Return the batch to run now and mark the model busy, or None to run nothing."""
        if self.busy or not self._queue:
            return None
        indices = select_batch(self._queue, self.policy.max_batch_size)
        items = tuple(self._queue[i] for i in indices)
        oldest_ms = self._enqueued_at_ms[indices[0]]
        if len(indices) == indices[-1] + 1:  # a prefix: the common case
            del self._queue[:len(indices)]
            del self._enqueued_at_ms[:len(indices)]
        else:
            chosen = set(indices)
            keep = [i for i in range(len(self._queue)) if i not in chosen]
            self._queue = [self._queue[i] for i in keep]
            self._enqueued_at_ms = [self._enqueued_at_ms[i] for i in keep]
        self.busy = True
        return Batch(items=items, rows=sum(item.rows for item in items),
                     queue_wait_ms=max(0.0, now_ms - oldest_ms))

    def batch_done(self) -> None:
        """Mark the model free again."""
        self.busy = False

    def drain_queue(self) -> list[T]:
        """Remove and return every waiting request (used when the model cannot run)."""
        items, self._queue, self._enqueued_at_ms = self._queue, [], []
        return items
