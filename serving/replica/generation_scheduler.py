"""The pure core of continuous batching: which sequences run, prefill and decode each step.

No torch, no threads, no clock of its own (`now_s` is passed in): the generation engine
(`generation_engine.py`) asks `plan()` what to do in the next step, runs it, and reports
back with `prefilled()`, `decoded()` and `finish()`. Sequences join the running batch and
leave it at every step:

- admission, first come first served, while the running batch has a free slot
  (`max_running`) and the KV-cache budget holds the sequence's whole reservation (prompt
  plus max_tokens, so an admitted sequence never runs out of cache midway);
- at most one prefill chunk per step (`prefill_chunk_tokens` of one prompt), next to one
  batched decode of every sequence already decoding: a long prompt costs the others one
  chunk's time per step instead of its whole prefill at once;
- a cancelled sequence (the client hung up) leaves at the next plan, its slot and cache
  reservation freed.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The waiting queue is at its limit (the replica answers 503)."""


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class GenerationLimits:
    """Batch and memory limits of one replica's generation engine."""

    max_running: int = 16  # sequences in the running batch
    max_cache_tokens: int = 32768  # KV-cache budget: sum of running (prompt + max_tokens)
    prefill_chunk_tokens: int = 64  # prompt tokens prefilled per step
    max_waiting: int = 256  # sequences queued for a slot; more are refused

    def __post_init__(self) -> None:
        for name in ("max_running", "max_cache_tokens", "prefill_chunk_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass
class ScheduledSequence:
    """What the scheduler knows of one sequence: token counts and its phase."""

    seq_id: int
    prompt_tokens: int
    max_tokens: int
    arrived_s: float
    phase: Phase = Phase.WAITING
    prefilled: int = 0  # prompt tokens already in the cache
    generated: int = 0
    admitted_s: float | None = None

    @property
    def reserved_tokens(self) -> int:
        """Return the cache tokens this sequence may need at most."""
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class StepPlan:
    """One step: the sequences freed and admitted, one prefill chunk, one decode batch."""

    freed: tuple[int, ...] = ()  # cancelled, running or waiting: drop them
    admitted: tuple[int, ...] = ()
    prefill: tuple[int, int, int] | None = None  # (seq_id, first token, end token)
    decode: tuple[int, ...] = ()

    @property
    def has_work(self) -> bool:
        """Return whether the step runs the model at all."""
        return self.prefill is not None or bool(self.decode)


@dataclass
class SchedulerCounts:
    """Totals since start, for /stats and the tests."""

    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    queue_s: list[float] = field(default_factory=list)  # recent admissions' waits (seconds)


class Scheduler:
    """Continuous batching decisions over plain counts (see the module docstring)."""

    def __init__(self, limits: GenerationLimits) -> None:
        self.limits = limits
        self._waiting: deque[ScheduledSequence] = deque()
        self._running: dict[int, ScheduledSequence] = {}  # insertion order = admission order
        self._cancelled: set[int] = set()
        self.counts = SchedulerCounts()

    @property
    def running(self) -> int:
        """Return how many sequences hold a slot."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Return how many sequences wait for a slot."""
        return len(self._waiting)

    @property
    def reserved_cache_tokens(self) -> int:
        """Return the cache tokens the running sequences have reserved."""
        return sum(seq.reserved_tokens for seq in self._running.values())

    @property
    def used_cache_tokens(self) -> int:
        """Return the tokens the running sequences hold in their caches now."""
        return sum(seq.prefilled + seq.generated for seq in self._running.values())

    def add(self, seq_id: int, prompt_tokens: int, max_tokens: int, now_s: float) -> None:
        """Queue a sequence; raise QueueFull, or ValueError when it can never fit."""
        if prompt_tokens < 1 or max_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token and one to generate")
        if prompt_tokens + max_tokens > self.limits.max_cache_tokens:
            raise ValueError(f"prompt plus max_tokens ({prompt_tokens + max_tokens}) exceeds "
                             f"the cache budget of {self.limits.max_cache_tokens} tokens")
        if len(self._waiting) >= self.limits.max_waiting:
            raise QueueFull(f"{self.limits.max_waiting} sequences are already waiting")
        self._waiting.append(ScheduledSequence(seq_id, prompt_tokens, max_tokens, now_s))

    def cancel(self, seq_id: int) -> None:
        """Mark a sequence cancelled; the next plan frees it (unknown ids are ignored)."""
        self._cancelled.add(seq_id)

    def plan(self, now_s: float) -> StepPlan:
        """Return the next step: free cancelled, admit, one prefill chunk, decode the rest."""
        freed = self._free_cancelled()
        decode = tuple(seq.seq_id for seq in self._running.values()
                       if seq.phase is Phase.DECODE)
        admitted = self._admit(now_s)
        prefill = self._next_prefill()
        if prefill is not None or decode:
            self.counts.steps += 1
        return StepPlan(freed, admitted, prefill, decode)

    def _free_cancelled(self) -> tuple[int, ...]:
        if not self._cancelled:
            return ()
        freed = tuple(seq_id for seq_id in self._running if seq_id in self._cancelled)
        for seq_id in freed:
            del self._running[seq_id]
        dropped = [seq for seq in self._waiting if seq.seq_id in self._cancelled]
        for seq in dropped:
            self._waiting.remove(seq)
        self.counts.cancelled += len(freed) + len(dropped)
        self._cancelled.clear()
        return freed + tuple(seq.seq_id for seq in dropped)

    def _admit(self, now_s: float) -> tuple[int, ...]:
        admitted = []
        reserved = self.reserved_cache_tokens
        while self._waiting and len(self._running) < self.limits.max_running:
            seq = self._waiting[0]
            if reserved + seq.reserved_tokens > self.limits.max_cache_tokens:
                break  # first come first served: no overtaking by smaller requests
            self._waiting.popleft()
            seq.phase, seq.admitted_s = Phase.PREFILL, now_s
            reserved += seq.reserved_tokens
            self._running[seq.seq_id] = seq
            admitted.append(seq.seq_id)
            self.counts.admitted += 1
            self.counts.queue_s = [*self.counts.queue_s[-999:], now_s - seq.arrived_s]
        return tuple(admitted)

    def _next_prefill(self) -> tuple[int, int, int] | None:
        for seq in self._running.values():
            if seq.phase is Phase.PREFILL:
                end = min(seq.prompt_tokens, seq.prefilled + self.limits.prefill_chunk_tokens)
                return seq.seq_id, seq.prefilled, end
        return None

    def prefilled(self, seq_id: int, end: int) -> bool:
        """Record a prefill chunk up to `end`; return whether the prompt is now complete
        (the engine then samples the first token from the chunk's last logits)."""
        seq = self._running[seq_id]
        seq.prefilled = end
        if end < seq.prompt_tokens:
            return False
        seq.phase = Phase.DECODE
        self.counts.prompt_tokens += seq.prompt_tokens
        self.decoded(seq_id)
        return True

    def decoded(self, seq_id: int) -> None:
        """Record one generated token."""
        self._running[seq_id].generated += 1
        self.counts.generated_tokens += 1

    def generated(self, seq_id: int) -> int:
        """Return the tokens generated so far by a running sequence."""
        return self._running[seq_id].generated

    def finish(self, seq_id: int) -> None:
        """Remove a sequence that ended (stop, length, error); its slot is free at once."""
        if self._running.pop(seq_id, None) is not None:
            self.counts.finished += 1
