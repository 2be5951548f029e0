"""The generation engine: one thread running continuous-batching steps of a causal LM.

Each step asks the pure scheduler (`generation_scheduler.py`) for a plan, then runs at most
one prefill chunk (one sequence, its own KV cache) and one batched decode forward of every
decoding sequence. Caches are kept per sequence (a list of (key, value) tensors per layer,
[1, heads, tokens, head_dim]); a decode step left-pads them into one batched
`DynamicCache` with an attention mask and explicit positions, runs one forward for all,
and slices each sequence's grown cache back out. Why per-sequence caches rather than one
persistent padded batch: sequences join and leave at every step, and a per-sequence cache
is dropped the moment its sequence leaves, with no compaction of a shared tensor; the
copy into the batch costs O(batch x cache) per step, small next to the forward on the
models a CPU replica serves (docs/architecture.md has the measurement).

Everything torch touches lives in this thread. Requests arrive and cancellations are
posted through a thread-safe queue; events (text deltas, the end) go out through each
sequence's `sink`, which the async side wraps with `call_soon_threadsafe`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.replica.generation_metrics import GenerationObserver, RecentTimings
from serving.replica.generation_sampling import choose_tokens, make_generator
from serving.replica.generation_scheduler import (
    GenerationLimits,
    QueueFull,
    Scheduler,
    StepPlan,
)
from serving.replica.generation_text import SamplingParams, TextStream

logger = logging.getLogger("serving.replica")
KV = list[tuple[Any, Any]]  # per layer: (keys, values), each [1, heads, tokens, head_dim]


@dataclass(frozen=True)
class GenerationEvent:
    """A text delta, or the end (finish_reason set) with the usage counts."""

    text: str
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int = 0  # with error: 400 (cannot fit), 503 (queue full), 500 (engine failure)


Sink = Callable[[GenerationEvent], None]


@dataclass
class LiveSequence:
    """A sequence's tensors-side state: tokens, cache, sampling and its text."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    generator: Any
    text: TextStream
    submitted_s: float = 0.0  # the engine's clock when submit() took it
    output_ids: list[int] = field(default_factory=list)
    cache: KV | None = None
    last_token_s: float | None = None  # when its latest token was sampled


class GenerationEngine:
    """Runs sequences of one model in a background thread (start() before submit())."""

    def __init__(self, model: Any, tokenizer: Any, limits: GenerationLimits,
                 clock: Callable[[], float] = time.monotonic,
                 observers: Sequence[GenerationObserver] = ()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(limits)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._clock = clock
        # Timings for /stats (the last minute's percentiles), then any exporters.
        self.timings = RecentTimings()
        self._observers: list[GenerationObserver] = [self.timings, *observers]
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._live: dict[int, LiveSequence] = {}
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._stopping = False
        self._snapshot: dict[str, Any] = {}
        self._refresh()

    def start(self) -> None:
        """Start the step loop thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the loop thread (running sequences end with finish_reason 'cancelled')."""
        self._inbox.put(("stop", None))
        self._thread.join(timeout_s)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> int:
        """Queue a sequence (any thread); return its id. Errors arrive as an event."""
        with self._id_lock:
            self._next_id += 1
            seq_id = self._next_id
        self._inbox.put(("add", LiveSequence(seq_id, prompt_ids, params, sink,
                                             make_generator(params.seed), TextStream(params.stop),
                                             self._clock())))
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """Cancel a sequence (any thread); its slot is freed at the next step."""
        self._inbox.put(("cancel", seq_id))

    def snapshot(self) -> dict[str, Any]:
        """Return the engine's counts as of its last plan or step, and the last minute's
        latency percentiles (generation_metrics.LATENCY_KEYS); safe from any thread."""
        return {**self._snapshot, **self.timings.snapshot(self._clock())}

    def counts(self) -> dict[str, Any]:
        """Return the engine's counts alone (cheaper than snapshot(): no percentiles)."""
        return self._snapshot

    def _refresh(self) -> None:
        """Publish the counts (engine thread): one dict swapped in, never mutated after."""
        counts = self.scheduler.counts
        self._snapshot = {
            "running": self.scheduler.running, "waiting": self.scheduler.waiting,
            "cache_tokens_used": self.scheduler.used_cache_tokens,
            "cache_tokens_reserved": self.scheduler.reserved_cache_tokens,
            "cache_tokens_limit": self.scheduler.limits.max_cache_tokens,
            "admitted": counts.admitted, "finished": counts.finished,
            "cancelled": counts.cancelled, "prompt_tokens": counts.prompt_tokens,
            "generated_tokens": counts.generated_tokens, "steps": counts.steps}

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stopping:
                self._drain_inbox(block=not self._live)
                self._refresh()
                if self._stopping:
                    break
                try:
                    self.step()
                except Exception as exc:  # a bug must not leave clients waiting forever
                    logger.exception("generation step failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
        self._fail_all(None)

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(block=block)
            while True:
                self._handle(message)
                message = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, message: tuple[str, Any]) -> None:
        kind, value = message
        if kind == "stop":
            self._stopping = True
        elif kind == "cancel":
            self.scheduler.cancel(value)
        elif kind == "add":
            self._add(value)

    def _add(self, seq: LiveSequence) -> None:
        try:
            self.scheduler.add(seq.seq_id, len(seq.prompt_ids), seq.params.max_tokens,
                               seq.submitted_s)
        except (QueueFull, ValueError) as exc:
            status = 503 if isinstance(exc, QueueFull) else 400
            seq.sink(GenerationEvent("", "error", len(seq.prompt_ids), 0, str(exc), status))
            return
        self._live[seq.seq_id] = seq

    def step(self) -> StepPlan:
        """Run one scheduling step (in the engine thread); return its plan."""
        now_s = self._clock()
        plan = self.scheduler.plan(now_s)
        for seq_id in plan.freed:
            self._end(seq_id, "cancelled")
        for seq_id in plan.admitted:
            queue_s = now_s - self._live[seq_id].submitted_s
            self._observe(functools.partial(_tell_admitted, queue_s=queue_s, now_s=now_s))
        self._refresh()  # before any token of this step reaches a client
        if plan.prefill is not None:
            self._prefill(*plan.prefill)
        if plan.decode:
            self._decode([self._live[seq_id] for seq_id in plan.decode])
        self._refresh()
        return plan

    def _prefill(self, seq_id: int, start: int, end: int) -> None:
        import torch

        seq = self._live[seq_id]
        device = self.model.device
        ids = torch.tensor([seq.prompt_ids[start:end]], dtype=torch.long, device=device)
        positions = torch.arange(start, end, dtype=torch.long, device=device).unsqueeze(0)
        logits, seq.cache = forward_one(self.model, ids, positions, seq.cache)
        if self.scheduler.prefilled(seq_id, end):
            self._observe(lambda observer: observer.prefilled(len(seq.prompt_ids)))
            self._accept(seq, int(choose_tokens(logits, [seq])[0]), self._clock())

    def _decode(self, batch: list[LiveSequence]) -> None:
        import torch

        last_ids = torch.tensor([[seq.output_ids[-1]] for seq in batch], dtype=torch.long,
                                device=self.model.device)
        caches = [seq.cache for seq in batch]
        assert all(cache is not None for cache in caches)
        logits, new_caches = forward_batch(self.model, last_ids, caches)  # type: ignore[arg-type]
        tokens = choose_tokens(logits, batch)
        now_s = self._clock()
        for seq, cache, token in zip(batch, new_caches, tokens, strict=True):
            seq.cache = cache
            self.scheduler.decoded(seq.seq_id)
            self._accept(seq, int(token), now_s)

    def _accept(self, seq: LiveSequence, token: int, now_s: float) -> None:
        """Take a sampled token (at `now_s`): stream its text, or end the sequence."""
        previous_s, seq.last_token_s = seq.last_token_s, now_s
        if previous_s is None:
            first_after_s = now_s - seq.submitted_s
            self._observe(lambda observer: observer.token(None, first_after_s, now_s))
        else:
            self._observe(lambda observer: observer.token(now_s - previous_s, None, now_s))
        if token in self.eos_ids and not seq.params.ignore_eos:
            self._end(seq.seq_id, "stop", flush=True)
            return
        seq.output_ids.append(token)
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        delta = seq.text.update(text)
        if delta:
            seq.sink(GenerationEvent(delta))
        if seq.text.stopped:
            self._end(seq.seq_id, "stop")
        elif len(seq.output_ids) >= seq.params.max_tokens:
            self._end(seq.seq_id, "length", flush=True)

    def _end(self, seq_id: int, reason: str, flush: bool = False, notify: bool = True,
             error: str | None = None) -> None:
        seq = self._live.pop(seq_id, None)
        self.scheduler.finish(seq_id)
        if seq is None:
            return
        if flush:
            rest = seq.text.flush(self.tokenizer.decode(seq.output_ids,
                                                        skip_special_tokens=True))
            if rest:
                seq.sink(GenerationEvent(rest))
        if notify:
            seq.sink(GenerationEvent("", reason, len(seq.prompt_ids), len(seq.output_ids),
                                     error, 500 if error else 0))
        latency_s = self._clock() - seq.submitted_s
        self._observe(lambda observer: observer.finished(reason, latency_s))

    def _observe(self, call: Callable[[GenerationObserver], None]) -> None:
        """Tell every observer; one that fails is logged, not fatal (a figure lost is
        better than a step failed for every running sequence)."""
        for observer in self._observers:
            try:
                call(observer)
            except Exception:
                logger.exception("generation observer %r failed", observer)

    def _fail_all(self, error: str | None) -> None:
        for seq_id in list(self._live):
            self.scheduler.cancel(seq_id)
            self._end(seq_id, "error" if error else "cancelled", error=error)
        self.scheduler.plan(self._clock())  # frees what was cancelled
        self._refresh()


def _tell_admitted(observer: GenerationObserver, queue_s: float, now_s: float) -> None:
    observer.admitted(queue_s, now_s)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else list(value or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def forward_one(model: Any, ids: Any, positions: Any, cache: KV | None) -> tuple[Any, KV]:
    """Return (last logits [1, vocab], grown cache) after feeding `ids` to one sequence."""
    import torch
    from transformers import DynamicCache

    past = DynamicCache()
    for layer, (keys, values) in enumerate(cache or []):
        past.update(keys, values, layer)
    length = positions[0, -1].item() + 1
    mask = torch.ones((1, length), dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                **{_cache_argument(model): past})
    return out.logits[:, -1, :], _layers(_returned_cache(out))


def forward_batch(model: Any, last_ids: Any, caches: list[KV]) -> tuple[Any, list[KV]]:
    """Return (logits [batch, vocab], grown caches) of one decode step over sequences.

    Caches of different lengths are left-padded to the longest; the mask hides the
    padding and each row's position is its own length, so a row computes what it would
    alone (up to float rounding in the padded reductions).
    """
    import torch
    from transformers import DynamicCache

    lengths = [cache[0][0].shape[2] for cache in caches]
    longest = max(lengths)
    past = DynamicCache()
    for layer in range(len(caches[0])):
        keys = _left_padded([cache[layer][0] for cache in caches], longest)
        values = _left_padded([cache[layer][1] for cache in caches], longest)
        past.update(keys, values, layer)
    mask = torch.zeros((len(caches), longest + 1), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, longest - length:] = 1
    positions = torch.tensor([[length] for length in lengths], dtype=torch.long,
                             device=last_ids.device)
    mask = mask.to(last_ids.device)
    out = model(input_ids=last_ids, position_ids=positions, attention_mask=mask,
                use_cache=True, **{_cache_argument(model): past})
    grown = _layers(_returned_cache(out))
    split = [[(keys[row:row + 1, :, longest - length:], values[row:row + 1, :, longest - length:])
              for keys, values in grown] for row, length in enumerate(lengths)]
    return out.logits[:, -1, :], split


def _left_padded(tensors: list[Any], longest: int) -> Any:
    """Return [rows, heads, longest, dim]: each [1, heads, n, dim] tensor left-padded."""
    import torch
    import torch.nn.functional as functional

    return torch.cat([tensor if tensor.shape[2] == longest else
                      functional.pad(tensor, (0, 0, longest - tensor.shape[2], 0))
                      for tensor in tensors])


def _cache_argument(model: Any) -> str:
    """Return the forward's cache keyword: `cache` (transformers 5.x) or past_key_values."""
    model_class: Any = model.__class__
    return _cache_argument_of(model_class)


@functools.cache
def _cache_argument_of(model_class: Any) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _layers(cache: Any) -> KV:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))
