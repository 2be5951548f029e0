"""The generate endpoints of a real replica process serving the tiny causal LM.

The tiny model (registry/demo_lm.py: random weights, a tokenizer trained on the shipped
text) answers gibberish, but greedy decoding makes it deterministic: what is tested is the
plumbing (generate, generate_stream, stop strings, max tokens, hang-ups, batching).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.demo_lm import cached_tiny_lm_archive
from serving.replica.generation_runner import TEXT_SIGNATURE
from tests.replica_models import ReplicaProcess, start_replica
from tests.waiting import wait_until

GENERATE = "/v2/models/tiny/generate"
STREAM = "/v2/models/tiny/generate_stream"
PROMPTS = ["Hello, world.", "The portal keeps a registry", "A swarm is many small",
           "What is a token? What is a stream? What is a slot?"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return cached_tiny_lm_archive(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="module")
def replica(tiny_lm, tmp_path_factory):
    process = start_replica(tmp_path_factory.mktemp("replica"), tiny_lm, "hf_causal_lm",
                            TEXT_SIGNATURE, name="tiny")
    yield process
    process.stop()


def generate(replica: ReplicaProcess, **body: Any) -> dict[str, Any]:
    with replica.client(timeout=60) as client:
        response = client.post(GENERATE, json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def generation_counts(replica: ReplicaProcess) -> dict[str, int]:
    with replica.client() as client:
        counts: dict[str, int] = client.get("/stats").json()["generation"]
        return counts


def stream_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
            if line.startswith("data: ")]


def test_generate_answers_text_with_finish_reason_and_usage(replica):
    answer = generate(replica, text_input="Hello, world.", max_tokens=8, ignore_eos=True)
    assert answer["model_name"] == "tiny" and answer["model_version"] == "1"
    assert answer["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 8
    assert answer["usage"]["prompt_tokens"] > 0
    assert answer["usage"]["total_tokens"] == 8 + answer["usage"]["prompt_tokens"]
    assert isinstance(answer["text_output"], str) and answer["text_output"]


def test_max_tokens_in_parameters_bounds_the_answer(replica):
    short = generate(replica, text_input="A swarm is", parameters={"max_tokens": 3,
                                                                   "ignore_eos": True})
    longer = generate(replica, text_input="A swarm is", parameters={"max_tokens": 12,
                                                                    "ignore_eos": True})
    assert short["usage"]["completion_tokens"] == 3
    assert longer["usage"]["completion_tokens"] == 12
    assert len(short["text_output"]) < len(longer["text_output"])


def test_the_stream_arrives_while_the_sequence_still_runs(replica):
    whole = generate(replica, text_input="The river runs", max_tokens=400, ignore_eos=True)
    body = {"text_input": "The river runs", "max_tokens": 400, "ignore_eos": True}
    events = []
    with replica.client(timeout=60) as client, client.stream("POST", STREAM,
                                                             json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                break
        # The first delta is in our hands while the engine is still generating the rest
        # (400 tokens take the engine hundreds of steps: a wide margin on a busy machine).
        assert generation_counts(replica)["running"] == 1
        events += [json.loads(line.removeprefix("data: ")) for line in lines
                   if line.startswith("data: ")]
    assert len(events) > 2
    assert all("finish_reason" not in event for event in events[:-1])
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 400
    assert "".join(event["text_output"] for event in events) == whole["text_output"]


def test_a_stop_string_ends_the_answer_before_it(replica):
    full = generate(replica, text_input="Hello, world.", max_tokens=40,
                    ignore_eos=True)["text_output"]
    clean = [i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3]]
    assert clean, f"no plain stretch in {full!r}"
    stop = full[clean[0]:clean[0] + 3]
    answer = generate(replica, text_input="Hello, world.", max_tokens=40, ignore_eos=True,
                      stop=[stop, "never appears here"])
    assert answer["finish_reason"] == "stop"
    assert answer["text_output"] == full[:full.index(stop)]
    assert answer["usage"]["completion_tokens"] < 40


def test_identical_greedy_requests_match_batched_or_alone(replica):
    alone = {prompt: generate(replica, text_input=prompt, max_tokens=24,
                              ignore_eos=True)["text_output"] for prompt in PROMPTS}
    batched: dict[str, str] = {}
    steps_before = generation_counts(replica)["steps"]

    def ask(prompt: str) -> None:
        batched[prompt] = generate(replica, text_input=prompt, max_tokens=24,
                                   ignore_eos=True)["text_output"]

    threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in PROMPTS * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert batched == alone
    # Eight sequences of 24 tokens took fewer steps than one after the other (8 x 24):
    # they shared decode steps.
    assert generation_counts(replica)["steps"] - steps_before < 8 * 24


def test_a_client_that_hangs_up_frees_its_slot(replica):
    before = generation_counts(replica)
    body = {"text_input": "Hello, world.", "max_tokens": 480, "ignore_eos": True}
    with replica.client(timeout=60) as client, client.stream("POST", STREAM,
                                                             json=body) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("data: ")
        assert generation_counts(replica)["running"] == 1
    # The connection is closed: the engine drops the sequence at its next step.
    after = wait_until(lambda: (counts := generation_counts(replica))["cancelled"]
                       > before["cancelled"] and counts, 30, "the sequence cancelled")
    assert after["running"] == 0 and after["waiting"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < 480


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"max_tokens": 4}', "text_input"),
    (b'{"text_input": "hi", "max_tokens": 0}', "max_tokens"),
    (b'{"text_input": "hi", "temperature": "hot"}', "temperature"),
    (b'{"text_input": "hi", "top_p": 0}', "top_p"),
    (b'{"text_input": "hi", "stop": [""]}', "stop"),
    (b'{"text_input": "hi", "parameters": []}', "parameters"),
    (b'{"text_input": "\\ud800 hi"}', "lone surrogate"),  # the tokenizer would raise
])
@pytest.mark.parametrize("path", [GENERATE, STREAM])
def test_malformed_generate_requests_get_400_json(replica, path, body, message):
    with replica.client() as client:
        response = client.post(path, content=body,
                               headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_prompt_longer_than_the_context_is_refused(replica):
    with replica.client() as client:
        response = client.post(GENERATE, json={"text_input": "Hello, world. " * 400})
    assert response.status_code == 400
    assert "context" in response.json()["error"]


def test_sampling_with_a_seed_repeats(replica):
    body = {"text_input": "A swarm is", "max_tokens": 16, "temperature": 1.5, "top_k": 50,
            "top_p": 0.95, "seed": 7, "ignore_eos": True}
    first, second = generate(replica, **body), generate(replica, **body)
    other = generate(replica, **{**body, "seed": 8})
    assert first["text_output"] == second["text_output"]
    assert other["text_output"] != first["text_output"]


def test_the_infer_endpoint_generates_too(replica):
    request = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1],
                           "data": ["Hello, world."]}]}
    with replica.client(timeout=60) as client:
        response = client.post("/v2/models/tiny/infer", json=request)
        metadata = client.get("/v2/models/tiny").json()
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["name"] == "text_output"
    assert metadata["platform"] == "transformers_causal_lm"


@pytest.fixture
def small_cache_replica(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_REPLICA_MAX_CACHE_TOKENS", "64")
    process = start_replica(tmp_path, tiny_lm, "hf_causal_lm", TEXT_SIGNATURE, name="tiny")
    yield process
    process.stop()


@pytest.mark.parametrize("path", [GENERATE, STREAM])
def test_a_sequence_the_cache_can_never_hold_is_refused_before_any_event(
        small_cache_replica, path):
    with small_cache_replica.client() as client:
        response = client.post(path, json={"text_input": "Hello", "max_tokens": 100})
        fits = client.post(path, json={"text_input": "Hello", "max_tokens": 10})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert "cache budget" in response.json()["error"]
    assert fits.status_code == 200
