"""The pure parts behind the replica's OpenAI endpoints and metrics: request parsing, the
recent-timings windows of /stats, and the Prometheus export (no process, no model)."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.replica.generation_metrics import LATENCY_KEYS, RecentTimings, RecentWindow
from serving.replica.generation_runner import plain_chat
from serving.replica.openai_request import OpenAIError, parse_request
from serving.replica.prometheus_metrics import ReplicaMetrics


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def test_a_chat_request_maps_roles_joins_text_parts_and_prefers_max_completion_tokens():
    request = parse_request(body(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                     {"type": "text", "text": "there"}], "name": "ann"}],
        max_tokens=50, max_completion_tokens=7, stop="END", seed=3, top_k=5), chat=True)
    assert request.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hello, there"}]
    params = request.params(max_tokens_limit=100, default_max_tokens=16)
    assert (params.max_tokens, params.stop, params.seed, params.top_k) == (7, ("END",), 3, 5)


def test_a_completion_takes_a_one_string_list_and_defaults_max_tokens():
    request = parse_request(body(prompt=["Hi"], stream=True,
                                 stream_options={"include_usage": True}), chat=False)
    assert (request.prompt, request.stream, request.include_usage) == ("Hi", True, True)
    assert request.params(max_tokens_limit=100, default_max_tokens=16).max_tokens == 16


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": True}, "n"),  # True == 1 in Python, but not a count
    ({"logprobs": 0}, "logprobs"),  # 0 == False, but asks for the sampled token's logprob
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stream": "yes"}, "stream"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
    ({"model": ""}, "model"),
])
def test_values_that_would_change_the_answer_are_refused(fields, param):
    with pytest.raises(OpenAIError) as raised:
        parse_request(body(messages=[{"role": "user", "content": "Hi"}], **fields), chat=True)
    assert raised.value.param == param and raised.value.status == 400
    assert raised.value.body()["error"]["type"] == "invalid_request_error"


def test_an_assistant_message_with_tool_calls_is_refused():
    with pytest.raises(OpenAIError, match="tool_calls"):
        parse_request(body(messages=[{"role": "assistant", "content": None,
                                      "tool_calls": [{"id": "1"}]}]), chat=True)


def test_the_plain_chat_fallback_ends_with_the_assistant_turn():
    assert plain_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) \
        == "system: S\nuser: U\nassistant:"


def test_a_window_forgets_values_older_than_a_minute_and_keeps_a_bounded_ring():
    window = RecentWindow(max_samples=3, window_s=60.0)
    assert window.p50_p99(0.0) == (None, None)
    for at_s, value_ms in ((0.0, 100.0), (10.0, 1.0), (20.0, 2.0), (30.0, 3.0)):
        window.add(at_s, value_ms)
    assert window.p50_p99(30.0) == (2.0, 3.0)  # the 100 ms fell out of the ring of 3
    assert window.p50_p99(85.0) == (3.0, 3.0)  # 10 s and 20 s are older than 60 s now
    assert window.p50_p99(200.0) == (None, None)


def test_recent_timings_report_every_key_in_milliseconds_or_null():
    timings = RecentTimings()
    assert timings.snapshot(0.0) == dict.fromkeys(LATENCY_KEYS)
    timings.admitted(0.002, now_s=1.0)
    timings.token(None, 0.010, now_s=1.0)  # the first token, 10 ms after submission
    for gap_ms in (4.0, 5.0, 6.0):
        timings.token(gap_ms / 1000.0, None, now_s=1.1)
    figures = timings.snapshot(2.0)
    assert (figures["queue_ms_p50"], figures["ttft_ms_p50"]) == (2.0, 10.0)
    assert (figures["itl_ms_p50"], figures["itl_ms_p99"]) == (5.0, 6.0)


def test_the_prometheus_export_counts_with_fixed_labels():
    metrics = ReplicaMetrics("lm", "3", "host:8001")
    snapshot = {"running": 2, "waiting": 1, "cache_tokens_used": 64,
                "cache_tokens_limit": 256}
    export = metrics.generation_observer(lambda: snapshot)
    export.admitted(0.5, 1.0)
    export.prefilled(12)
    export.token(None, 0.2, 1.0)
    export.token(0.01, None, 1.1)
    export.finished("length", 1.5)
    export.finished("unknown reason", 1.5)  # not a new series
    samples = {(s.name, s.labels.get("finish_reason")): s
               for family in text_string_to_metric_families(metrics.render().decode())
               for s in family.samples}
    assert samples[("swarm_replica_prompt_tokens_total", None)].value == 12
    assert samples[("swarm_replica_generation_tokens_total", None)].value == 2
    assert samples[("swarm_replica_requests_finished_total", "length")].value == 1
    assert samples[("swarm_replica_requests_finished_total", "stop")].value == 0
    assert samples[("swarm_replica_e2e_request_latency_seconds_count", None)].value == 2
    assert samples[("swarm_replica_kv_cache_usage_ratio", None)].value == 0.25
    assert samples[("swarm_replica_sequences_running", None)].value == 2
    reasons = {s.labels.get("finish_reason") for s in samples.values()} - {None}
    assert reasons == {"stop", "length", "cancelled", "error"}
    assert {(s.labels["model"], s.labels["version"], s.labels["replica"])
            for s in samples.values()} == {("lm", "3", "host:8001")}
