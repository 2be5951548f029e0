"""OpenAI's endpoints and the engine's metrics on a real replica process (the tiny LM).

The official `openai` client talks to the replica as it would to OpenAI. The tiny model
answers gibberish, but greedy decoding makes it deterministic, so what is checked is the
plumbing: shapes, streams, stop strings, lengths, usage, errors, and that the figures
the engine exports follow the requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jinja2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.demo_lm import CHAT_TEMPLATE, cached_tiny_lm_archive
from serving.replica.generation_metrics import LATENCY_KEYS
from serving.replica.generation_runner import TEXT_SIGNATURE
from tests.replica_models import KEY, ReplicaProcess, start_replica
from tests.waiting import wait_until

GENERATE = "/v2/models/tiny/generate"
MODEL = "tiny-chat-model-as-the-client-names-it"
LONG = {"ignore_eos": True}  # the tiny model may pick EOS early: lengths stay exact


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Any:
    archive = cached_tiny_lm_archive(tmp_path_factory.mktemp("tiny-lm"))
    process = start_replica(tmp_path_factory.mktemp("replica"), archive, "hf_causal_lm",
                            TEXT_SIGNATURE, name="tiny")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(replica: ReplicaProcess) -> Any:
    with openai.OpenAI(base_url=replica.url + "/v1", api_key=KEY, max_retries=0,
                       timeout=60) as client:
        yield client


def generate_text(replica: ReplicaProcess, prompt: str, max_tokens: int) -> str:
    with replica.client(timeout=60) as http:
        response = http.post(GENERATE, json={"text_input": prompt, "max_tokens": max_tokens,
                                             "ignore_eos": True})
    assert response.status_code == 200, response.text
    text: str = response.json()["text_output"]
    return text


def rendered_chat(messages: list[dict[str, str]]) -> str:
    """The prompt the tiny model's template makes (transformers renders it so too)."""
    # A prompt, not HTML: nothing to escape.
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                                     autoescape=False)  # noqa: S701
    return environment.from_string(CHAT_TEMPLATE).render(messages=messages,
                                                         add_generation_prompt=True)


def stats(replica: ReplicaProcess) -> dict[str, Any]:
    with replica.client() as http:
        figures: dict[str, Any] = http.get("/stats").json()["generation"]
        return figures


def test_a_completion_has_openai_shape_and_equals_generate(client, replica):
    answer = client.completions.create(model=MODEL, prompt="Hello, world.", max_tokens=12,
                                       extra_body=LONG)
    assert answer.id.startswith("cmpl-") and answer.object == "text_completion"
    assert answer.model == MODEL and answer.created > 1_700_000_000
    [choice] = answer.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.text == generate_text(replica, "Hello, world.", 12)
    assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == 12 + answer.usage.prompt_tokens


def test_a_chat_completion_applies_the_template_and_equals_generate(client, replica):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a swarm?"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            extra_body=LONG)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.model == MODEL
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == generate_text(replica, rendered_chat(messages), 10)
    assert answer.usage.completion_tokens == 10
    # The prompt is the rendered template: its role markers count as prompt tokens.
    plain = client.completions.create(model=MODEL, prompt="What is a swarm?", max_tokens=1)
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 4


def test_max_completion_tokens_bounds_a_chat_answer(client):
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=3,
        extra_body=LONG)
    assert answer.usage.completion_tokens == 3
    assert answer.choices[0].finish_reason == "length"


def test_a_streamed_chat_equals_the_whole_one_and_ends_with_usage(client):
    messages = [{"role": "user", "content": "Tell me of the river."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30,
                                           extra_body=LONG)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages,
                                                 max_tokens=30, stream=True,
                                                 extra_body=LONG))
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == MODEL
               for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == whole.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks[:-1]] == [None] * (
        len(chunks) - 1)
    # Usage on the final chunk without stream_options: the gateway counts tokens from it.
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 30
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_a_streamed_completion_with_include_usage_ends_with_a_usage_chunk(client):
    whole = client.completions.create(model=MODEL, prompt="A swarm is", max_tokens=20,
                                      extra_body=LONG)
    chunks = list(client.completions.create(model=MODEL, prompt="A swarm is",
                                            max_tokens=20, stream=True, extra_body=LONG,
                                            stream_options={"include_usage": True}))
    assert all(chunk.id.startswith("cmpl-") for chunk in chunks)
    *text_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.total_tokens == whole.usage.total_tokens
    assert all(chunk.usage is None for chunk in text_chunks)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == whole.choices[0].text


def test_the_raw_stream_is_data_lines_then_done(replica):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "stream": True, **LONG}
    with replica.client(timeout=60) as http, http.stream("POST", "/v1/completions",
                                                         json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 5


def test_a_stop_string_ends_the_answer_before_it(client):
    full = client.completions.create(model=MODEL, prompt="Hello, world.", max_tokens=40,
                                     extra_body=LONG).choices[0].text
    clean = [i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3]]
    assert clean, f"no plain stretch in {full!r}"
    stop = full[clean[0]:clean[0] + 3]
    for stops in (stop, [stop, "never appears here"]):
        answer = client.completions.create(model=MODEL, prompt="Hello, world.",
                                           max_tokens=40, stop=stops, extra_body=LONG)
        assert answer.choices[0].finish_reason == "stop"
        assert answer.choices[0].text == full[:full.index(stop)]
        assert answer.usage.completion_tokens < 40


def test_a_seeded_sample_repeats(client):
    def sample(seed: int) -> str | None:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
            temperature=1.5, top_p=0.95, seed=seed, extra_body={"top_k": 50, **LONG},
        ).choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_the_official_client_raises_bad_request_on_unsupported_fields(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                               "content": "Hi"}], n=2)
    assert raised.value.status_code == 400
    assert raised.value.param == "n" and raised.value.type == "invalid_request_error"


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", b"not json", None),
    ("/v1/chat/completions", b"[1]", None),
    ("/v1/chat/completions", {**CHAT, "n": 2}, "n"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "made_up_field": 1}, "made_up_field"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool",
                                                            "content": "x"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": ["one", "two"]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "echo": True}, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "messages": []}, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello " * 600}, "prompt"),
    # A lone surrogate: JSON allows it, the tokenizer raises on it (was a 500).
    ("/v1/completions", b'{"model": "m", "prompt": "\\ud800"}', "prompt"),
    ("/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
])
def test_bad_requests_get_400_in_openai_error_shape(replica, path, body, param):
    with replica.client() as http:
        if isinstance(body, bytes):
            response = http.post(path, content=body,
                                 headers={"content-type": "application/json"})
        else:
            response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_defaults_that_clients_send_are_accepted(replica):
    body = {**CHAT, "max_tokens": 2, "n": 1, "logprobs": False, "presence_penalty": 0,
            "frequency_penalty": 0.0, "user": "someone", "stream": False, "tools": None,
            "response_format": {"type": "text"}}
    with replica.client(timeout=60) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_stream_whose_client_hangs_up_is_cancelled(replica):
    before = stats(replica)
    body = {**CHAT, "max_tokens": 480, "stream": True, **LONG}
    with replica.client(timeout=60) as http, http.stream("POST", "/v1/chat/completions",
                                                         json=body) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("data: ")
    after = wait_until(lambda: (counts := stats(replica))["cancelled"]
                       > before["cancelled"] and counts, 30, "the sequence cancelled")
    assert after["running"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < 480


def test_stats_and_metrics_report_the_engine_figures(replica, client):
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="The portal", max_tokens=8,
                                  extra_body=LONG)
    figures = stats(replica)
    for name in ("ttft", "itl", "queue"):
        p50, p99 = figures[f"{name}_ms_p50"], figures[f"{name}_ms_p99"]
        assert isinstance(p50, float) and 0 <= p50 <= p99 < 60_000, (name, p50, p99)
    assert set(LATENCY_KEYS) <= set(figures) and "running" in figures

    with replica.client() as http:
        response = http.get("/metrics")
        refused = httpx.get(replica.url + "/metrics")
    assert refused.status_code == 401
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {(sample.name, sample.labels.get("finish_reason")): sample
               for family in text_string_to_metric_families(response.text)
               for sample in family.samples}
    count = samples[("swarm_replica_time_to_first_token_seconds_count", None)]
    assert count.labels["model"] == "tiny" and count.labels["version"] == "1"
    assert count.value >= 3
    assert samples[("swarm_replica_inter_token_latency_seconds_count", None)].value >= 3 * 7
    assert samples[("swarm_replica_queue_time_seconds_count", None)].value >= 3
    assert samples[("swarm_replica_e2e_request_latency_seconds_count", None)].value >= 3
    assert samples[("swarm_replica_generation_tokens_total", None)].value >= 3 * 8
    assert samples[("swarm_replica_prompt_tokens_total", None)].value >= 3
    assert samples[("swarm_replica_requests_finished_total", "length")].value >= 3
    assert ("swarm_replica_requests_finished_total", "error") in samples
    assert samples[("swarm_replica_sequences_running", None)].value == 0
    assert samples[("swarm_replica_sequences_waiting", None)].value == 0
    assert 0 <= samples[("swarm_replica_kv_cache_usage_ratio", None)].value <= 1


def test_the_models_list_names_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["tiny"]


def test_openai_paths_are_absent_from_a_replica_without_generation(tmp_path):
    # Covered at the app level: only hf_causal_lm replicas route /v1 (a 404 elsewhere).
    from tests.replica_models import MLP_SIGNATURE, build_tabular_mlp, save_torchscript

    model = save_torchscript(build_tabular_mlp(), tmp_path / "mlp.pt")
    process = start_replica(tmp_path, Path(model), "torchscript", MLP_SIGNATURE)
    try:
        with process.client() as http:
            missing = http.post("/v1/completions", json={"model": "m", "prompt": "x"})
            metrics = http.get("/metrics")
    finally:
        process.stop()
    assert missing.status_code == 404
    assert metrics.status_code == 200 and "swarm_replica_in_flight_requests" in metrics.text


def test_refusals_before_the_handler_keep_openai_shape_under_v1(replica):
    with openai.OpenAI(base_url=replica.url + "/v1", api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with replica.client() as http:
        unknown = http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        wrong_method = http.get("/v1/chat/completions")
        oip = http.get("/v2/models/nope")
    assert unknown.status_code == 404 and wrong_method.status_code == 405
    for response in (unknown, wrong_method):
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert isinstance(oip.json()["error"], str)  # OIP paths keep OIP's shape
