"""The pure parts of generation: continuous-batching decisions, sampling fields, stop strings.

No model and no threads here, except the last test, which runs the engine in-process on
the tiny model to count what a cancellation frees.
"""

from __future__ import annotations

import threading

import pytest

from serving.replica.generation_scheduler import GenerationLimits, QueueFull, Scheduler
from serving.replica.generation_text import GenerateInputError, SamplingParams, TextStream


def drive(scheduler: Scheduler, now_s: float = 0.0):
    """Run one plan as the engine would: record the prefill chunk and the decodes."""
    plan = scheduler.plan(now_s)
    if plan.prefill is not None:
        seq_id, _, end = plan.prefill
        scheduler.prefilled(seq_id, end)
    for seq_id in plan.decode:
        scheduler.decoded(seq_id)
    return plan


def test_sequences_join_the_running_batch_at_the_next_step():
    scheduler = Scheduler(GenerationLimits(max_running=4, prefill_chunk_tokens=100))
    scheduler.add(1, prompt_tokens=5, max_tokens=10, now_s=0.0)
    first = drive(scheduler)
    assert first.admitted == (1,) and first.prefill == (1, 0, 5) and first.decode == ()
    scheduler.add(2, prompt_tokens=5, max_tokens=10, now_s=0.1)
    second = drive(scheduler, 0.1)
    # 2 is prefilled while 1 decodes in the same step: nobody waits for a batch to end.
    assert second.admitted == (2,) and second.prefill == (2, 0, 5) and second.decode == (1,)
    assert drive(scheduler, 0.2).decode == (1, 2)


def test_a_finished_sequence_leaves_and_a_waiting_one_takes_its_slot():
    scheduler = Scheduler(GenerationLimits(max_running=1))
    scheduler.add(1, 3, 5, 0.0)
    scheduler.add(2, 3, 5, 0.0)
    drive(scheduler)
    assert (scheduler.running, scheduler.waiting) == (1, 1)
    scheduler.finish(1)
    plan = drive(scheduler, 1.0)
    assert plan.admitted == (2,)
    assert scheduler.counts.queue_s[-1] == 1.0


def test_a_long_prompt_is_prefilled_in_chunks_next_to_the_decodes():
    scheduler = Scheduler(GenerationLimits(prefill_chunk_tokens=16))
    scheduler.add(1, 4, 100, 0.0)
    drive(scheduler)
    scheduler.add(2, 50, 10, 0.0)
    chunks = [drive(scheduler) for _ in range(4)]
    assert [plan.prefill for plan in chunks] == [(2, 0, 16), (2, 16, 32), (2, 32, 48),
                                                 (2, 48, 50)]
    assert all(plan.decode == (1,) for plan in chunks)  # 1 kept decoding every step
    assert drive(scheduler).decode == (1, 2)


def test_the_cache_budget_holds_back_admission_first_come_first_served():
    scheduler = Scheduler(GenerationLimits(max_cache_tokens=100))
    scheduler.add(1, 10, 60, 0.0)  # reserves 70
    scheduler.add(2, 10, 30, 0.0)  # 40 more would pass 100: waits
    scheduler.add(3, 1, 1, 0.0)  # fits, but does not overtake 2
    assert drive(scheduler).admitted == (1,)
    assert scheduler.waiting == 2 and scheduler.reserved_cache_tokens == 70
    scheduler.finish(1)
    assert drive(scheduler).admitted == (2, 3)


def test_cancelled_sequences_are_freed_at_the_next_plan():
    scheduler = Scheduler(GenerationLimits(max_running=1))
    scheduler.add(1, 3, 5, 0.0)
    scheduler.add(2, 3, 5, 0.0)
    drive(scheduler)
    scheduler.cancel(1)
    scheduler.cancel(2)
    plan = drive(scheduler)
    assert set(plan.freed) == {1, 2}
    assert (scheduler.running, scheduler.waiting, scheduler.counts.cancelled) == (0, 0, 2)


def test_limits_refuse_what_can_never_run_and_a_full_queue():
    scheduler = Scheduler(GenerationLimits(max_cache_tokens=50, max_waiting=1))
    with pytest.raises(ValueError, match="cache budget"):
        scheduler.add(1, 40, 20, 0.0)
    scheduler.add(2, 1, 1, 0.0)
    with pytest.raises(QueueFull):
        scheduler.add(3, 1, 1, 0.0)
    with pytest.raises(ValueError):
        GenerationLimits(max_running=0)


def test_sampling_fields_are_checked():
    params = SamplingParams.parse({"max_tokens": 5, "temperature": 0.7, "top_p": 0.9,
                                   "top_k": 40, "seed": 3, "stop": "\n"}, 100)
    assert params.stop == ("\n",) and not params.greedy
    assert SamplingParams.parse({}, 100).greedy
    for bad in ({"max_tokens": 101}, {"max_tokens": True}, {"temperature": -1},
                {"top_p": 1.5}, {"top_k": "3"}, {"seed": -1}, {"stop": [1]},
                {"ignore_eos": "yes"}):
        with pytest.raises(GenerateInputError):
            SamplingParams.parse(bad, 100)


def test_the_text_stream_holds_back_a_possible_stop_string_and_cuts_before_it():
    stream = TextStream(("END",))
    assert stream.update("Hello E") == "Hello "  # "E" may begin END
    assert stream.update("Hello EN") == ""
    assert stream.update("Hello ENX") == "ENX"  # it did not
    assert stream.update("Hello ENX and END and more") == " and "
    assert stream.stopped and stream.sent == "Hello ENX and "


def test_the_text_stream_waits_for_a_whole_character():
    stream = TextStream()
    assert stream.update("caf\ufffd") == "caf"
    assert stream.update("café") == "é"
    assert stream.flush("café!") == "!"


def test_the_engine_frees_a_cancelled_sequence_at_its_next_step(tmp_path):
    from registry.demo_lm import cached_tiny_lm_archive
    from serving.replica.generation_engine import GenerationEngine
    from swarm_protocol.archive import inspect_archive
    from swarm_protocol.model_loading import load_causal_lm

    model, tokenizer = load_causal_lm(inspect_archive(str(cached_tiny_lm_archive(tmp_path))))
    engine = GenerationEngine(model, tokenizer, GenerationLimits(max_running=2))
    first_token, ended = threading.Event(), threading.Event()
    events = []

    def sink(event):
        events.append(event)
        first_token.set()
        if event.finish_reason:
            ended.set()

    engine.start()
    try:
        seq_id = engine.submit([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True),
                               sink)
        assert first_token.wait(60)
        engine.cancel(seq_id)
        assert ended.wait(60)
    finally:
        engine.stop()
    counts = engine.snapshot()
    assert events[-1].finish_reason == "cancelled"
    assert (counts["running"], counts["cancelled"], counts["finished"]) == (0, 1, 0)
    assert counts["generated_tokens"] < 400


def test_the_pure_parts_import_neither_torch_nor_django():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, serving.replica.generation_scheduler, serving.replica.generation_text;"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'django', 'torch', 'transformers', 'numpy'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
