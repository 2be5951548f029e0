"""The gateway's OpenAI-compatible endpoints, spoken to by the official `openai` client.

Real processes: two replica processes serving the tiny causal LM (registry/demo_lm.py) as
versions 1 and 2 of one deployment, and the standalone gateway (lean HTTP/1.1 server) in
front of them, reading its table from a file. The tiny model's text is gibberish, but
greedy decoding is deterministic, so a streamed answer must equal the whole one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from registry.demo_lm import cached_tiny_lm_archive
from serving.gateway.app import GatewayApp
from serving.gateway.filesource import FileTableSource, write_table
from serving.gateway.routes import VersionInfo
from serving.replica.generation_runner import TEXT_SIGNATURE
from tests.gateway_helpers import (
    BEARER,
    SECRET,
    GatewayThread,
    MemoryTableSource,
    StandaloneGateway,
    api_key,
    deployment,
    replica_route,
    table,
)
from tests.replica_models import ReplicaProcess, free_port, start_replica

pytestmark = pytest.mark.slow
LM_INFO = VersionInfo("transformers_causal_lm", TEXT_SIGNATURE["inputs"],
                      TEXT_SIGNATURE["outputs"])
TABULAR_ONLY = "swk_test_tabular_only"  # a key for the non-generative deployment alone
TOKEN_LIMITED = "swk_test_forty_tokens"  # 40 tokens a minute: one answer spends them
STREAM_LIMITED = "swk_test_forty_tokens_streamed"
GENERATE_LIMITED = ["swk_test_forty_tokens_generate", "swk_test_forty_tokens_generate_stream"]
GREEDY: dict[str, Any] = {"max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[list[ReplicaProcess]]:
    directory = tmp_path_factory.mktemp("openai-replicas")
    archive = cached_tiny_lm_archive(directory)
    started: list[ReplicaProcess] = []
    try:
        for version in (1, 2):
            started.append(start_replica(directory, archive, "hf_causal_lm", TEXT_SIGNATURE,
                                         name="tiny", version=version))
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture(scope="module")
def table_path(replicas, tmp_path_factory) -> Path:
    path: Path = tmp_path_factory.mktemp("openai-gateway") / "table.json"
    v1, v2 = replicas
    tiny = deployment("tiny", [replica_route(v1, 1, 1), replica_route(v2, 2, 2)],
                      weights={1: 1.0, 2: 0.0}, info=LM_INFO)
    # A canary split over the same two processes (the replica serves any model string).
    canary = deployment("canary", [replica_route(v1, 11, 1), replica_route(v2, 12, 2)],
                        weights={1: 0.5, 2: 0.5}, info=LM_INFO)
    # Not generative: listed nowhere under /v1, refused as a /v1 model (never called).
    tabular = deployment("tabular", [replica_route(free_port(), 3)])
    write_table(path, table(tiny, canary, tabular, keys=[
        api_key(TABULAR_ONLY, 2, ["tabular"]),
        api_key(TOKEN_LIMITED, 3, tokens_per_minute=40),
        api_key(STREAM_LIMITED, 4, tokens_per_minute=40),
        *(api_key(secret, 5 + n, tokens_per_minute=40)
          for n, secret in enumerate(GENERATE_LIMITED))]))
    return path


@pytest.fixture(scope="module")
def gateway(table_path) -> Iterator[StandaloneGateway]:
    process = StandaloneGateway(table_path)  # the lean HTTP/1.1 server
    yield process
    process.stop()


@pytest.fixture(scope="module")
def asgi_gateway(table_path) -> Iterator[StandaloneGateway]:
    process = StandaloneGateway(table_path, "--http", "uvicorn")  # the ASGI app
    yield process
    process.stop()


def client(gateway: StandaloneGateway | GatewayThread, key: str = SECRET) -> openai.OpenAI:
    # No retries: a 429 or 5xx must reach the test, not be retried away.
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)


def generation_count(replica: ReplicaProcess) -> int:
    with replica.client() as http:
        return int(http.get("/stats").json()["generation"]["finished"])


def test_models_lists_the_generative_deployments_the_key_may_use(gateway):
    assert [model.id for model in client(gateway).models.list()] == ["canary", "tiny"]
    assert list(client(gateway, TABULAR_ONLY).models.list()) == []
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "swk_not_a_key").models.list()


def test_completion_whole_and_streamed_agree(gateway):
    api = client(gateway)
    whole = api.completions.create(model="tiny", prompt="Hello, world.", **GREEDY)
    assert whole.model == "tiny" and whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 6
    streamed = api.completions.create(model="tiny", prompt="Hello, world.", stream=True,
                                      **GREEDY)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == \
        whole.usage.total_tokens


def test_chat_completion_whole_and_streamed_agree(gateway):
    api = client(gateway)
    messages: Any = [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "What is a swarm?"}]
    whole = api.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert whole.object == "chat.completion" and whole.model == "tiny"
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content
    stream = api.chat.completions.create(model="tiny", messages=messages, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def _ascii_pair_after_start(text: str) -> str:
    """Return the first two ASCII letters in a row past the text's first character."""
    for start in range(1, len(text) - 1):
        pair = text[start:start + 2]
        if pair.isascii() and pair.isalpha():
            return pair
    raise AssertionError(f"no ASCII pair in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_the_answer_through_the_gateway(gateway, stream):
    api = client(gateway)
    greedy = {**GREEDY, "max_tokens": 24}
    whole = api.completions.create(model="tiny", prompt="The river runs", **greedy)
    text = whole.choices[0].text
    stop = _ascii_pair_after_start(text)
    if stream:
        chunks = list(api.completions.create(model="tiny", prompt="The river runs",
                                             stop=[stop], stream=True, **greedy))
        cut = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        answer = api.completions.create(model="tiny", prompt="The river runs", stop=stop,
                                        **greedy)
        cut, finish = answer.choices[0].text, answer.choices[0].finish_reason
    assert cut == text[:text.find(stop)]  # cut before the stop string, which is not sent
    assert finish == "stop"


def test_the_asgi_transport_streams_the_same_answer(gateway, asgi_gateway):
    messages: Any = [{"role": "user", "content": "What is a swarm?"}]
    lean = client(gateway).chat.completions.create(model="tiny", messages=messages, **GREEDY)
    chunks = list(client(asgi_gateway).chat.completions.create(
        model="tiny", messages=messages, stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        lean.choices[0].message.content
    assert [m.id for m in client(asgi_gateway).models.list()] == ["canary", "tiny"]


def test_name_colon_n_pins_the_version(gateway, replicas):
    v1, v2 = replicas
    before = generation_count(v1), generation_count(v2)
    pinned = client(gateway).completions.create(model="tiny:2", prompt="A swarm", **GREEDY)
    assert pinned.model == "tiny:2"  # the replica echoes the request's model
    assert (generation_count(v1), generation_count(v2)) == (before[0], before[1] + 1)
    with pytest.raises(openai.NotFoundError) as unknown:
        client(gateway).completions.create(model="tiny:3", prompt="A swarm", **GREEDY)
    assert "version" in unknown.value.message


def test_a_canary_split_spreads_requests_over_both_versions(gateway, replicas):
    before = [generation_count(replica) for replica in replicas]
    api = client(gateway)
    for _ in range(16):  # all 16 on one version: 2 * 0.5**16, about 3e-5
        api.completions.create(model="canary", prompt="A swarm", max_tokens=1)
    after = [generation_count(replica) for replica in replicas]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(after) - sum(before) == 16


class Sessions:
    """The portal's session check, answered here: only the session "good" is logged in."""

    async def allows(self, session_key: str, deployment: str) -> bool:
        return session_key == "good"


def test_a_portal_session_uses_v1_without_a_key(table_path):
    # The playground calls /v1 from the browser with its session cookie, no API key.
    with GatewayThread(GatewayApp(FileTableSource(table_path), Sessions())) as served, \
            httpx.Client(base_url=served.url, timeout=60) as http:
        good, stale = {"Cookie": "csrftoken=x; sessionid=good"}, {"Cookie": "sessionid=stale"}
        assert [m["id"] for m in http.get("/v1/models", headers=good).json()["data"]] == \
            ["canary", "tiny"]
        chat = http.post("/v1/chat/completions", headers=good, json={
            "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 2
        assert http.get("/v1/models", headers=stale).status_code == 401
        assert http.post("/v1/completions", headers=stale, json={
            "model": "tiny", "prompt": "x"}).status_code == 401


def test_bogus_v1_requests_grow_no_state(table_path):
    app = GatewayApp(FileTableSource(table_path))
    with GatewayThread(app) as served, httpx.Client(base_url=served.url, timeout=60) as http:
        auth = {"Authorization": f"Bearer {SECRET}"}
        assert http.post("/v1/completions", headers=auth, json={
            "model": "tiny", "prompt": "x", "max_tokens": 1}).status_code == 200
        before = app.state_sizes()
        for n in range(200):
            bogus = {"Authorization": f"Bearer swk_bogus_{n}", "Cookie": f"sessionid=s{n}"}
            assert http.post("/v1/completions", headers=bogus, json={
                "model": f"made-up-{n}", "prompt": "x"}).status_code == 401
            assert http.get("/v1/models", headers=bogus).status_code == 401
            assert http.post("/v1/chat/completions", headers=auth, json={
                "model": f"made-up-{n}", "messages": []}).status_code == 404
            assert http.post("/v1/completions", headers=auth, json={
                "model": f"tiny:{n + 3}", "prompt": "x"}).status_code == 404
        assert app.state_sizes() == before


def test_prefix_affinity_keeps_a_shared_prefix_on_one_replica(replicas):
    # Both processes as one version of "tiny" (the /v2 path names the replicas' model).
    sticky = deployment("tiny", [replica_route(replicas[0], 1, 1),
                                 replica_route(replicas[1], 2, 1)],
                        info=LM_INFO, prefix_affinity_chars=64)
    app = GatewayApp(MemoryTableSource(table(sticky)))
    system = "You are the swarm's assistant. Answer every question in one short line."

    def deltas(send: Any) -> list[int]:
        before = [generation_count(replica) for replica in replicas]
        send()
        return [generation_count(r) - b for r, b in zip(replicas, before, strict=True)]

    with GatewayThread(app) as served:
        api = client(served)
        chats = deltas(lambda: [api.chat.completions.create(model="tiny", max_tokens=1, messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question {n}?"}]) for n in range(6)])
        assert sorted(chats) == [0, 6]
        generates = deltas(lambda: [httpx.post(
            f"{served.url}/v2/models/tiny/generate", headers=BEARER, timeout=60,
            json={"text_input": f"{system} Question {n}?", "max_tokens": 1}
        ).raise_for_status() for n in range(6)])
        assert sorted(generates) == [0, 6]
        # Different prefixes spread: all 16 on one replica has odds of 2 * 0.5**16.
        spread = deltas(lambda: [api.completions.create(
            model="tiny", prompt=f"{n} " * 40, max_tokens=1) for n in range(16)])
        assert min(spread) > 0 and sum(spread) == 16


def test_unknown_and_non_generative_models_are_404(gateway):
    for model in ("no-such-model", "tabular"):
        with pytest.raises(openai.NotFoundError) as refused:
            client(gateway).completions.create(model=model, prompt="x", max_tokens=2)
        assert refused.value.code == "model_not_found", model


def test_no_or_wrong_credentials_are_401(gateway):
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "swk_wrong").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    answer = httpx.post(gateway.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert answer.status_code == 401
    assert answer.json()["error"]["type"] == "authentication_error"
    assert answer.headers["www-authenticate"] == "Bearer"


def test_a_spent_token_limit_is_429_until_the_bucket_refills(gateway):
    limited = client(gateway, TOKEN_LIMITED)
    # 40 tokens a minute, and one answer of 40 new tokens plus its prompt overspends them.
    limited.completions.create(model="tiny", prompt="Hello, world.", max_tokens=40,
                               temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as refused:
        limited.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert refused.value.response.headers["retry-after"].isdigit()
    assert refused.value.body["type"] == "tokens"  # type: ignore[index]
    # Another key is not charged for it.
    assert client(gateway).completions.create(model="tiny", prompt="x", max_tokens=2)


def test_a_streamed_answer_is_charged_from_its_usage_event(gateway):
    limited = client(gateway, STREAM_LIMITED)
    # A long prompt and two new tokens: only the usage event (prompt tokens included)
    # says the answer cost more than 40 tokens; the stream's few events do not.
    stream = limited.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there, swarm. " * 20}],
        stream=True, max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(stream)
    # Without include_usage the replica still puts usage on the finishing chunk: the
    # gateway charges it from there.
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 2 and usage.total_tokens > 60
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)


@pytest.mark.parametrize("first", ["generate", "generate_stream"])
def test_v2_generate_answers_are_charged_to_the_token_limit_too(gateway, first):
    secret = GENERATE_LIMITED[first == "generate_stream"]
    auth = {"Authorization": f"Bearer {secret}"}
    long_prompt = {"text_input": "Hello there, swarm. " * 20, "max_tokens": 2,
                   "ignore_eos": True}
    spent = httpx.post(f"{gateway.url}/v2/models/tiny/{first}", json=long_prompt,
                       headers=auth, timeout=60)
    assert spent.status_code == 200 and "usage" in spent.text
    for action in ("generate", "generate_stream"):
        refused = httpx.post(f"{gateway.url}/v2/models/tiny/{action}", headers=auth,
                             json={"text_input": "x", "max_tokens": 1}, timeout=60)
        assert refused.status_code == 429, refused.text
        assert isinstance(refused.json()["error"], str)  # the /v2 shape
        assert refused.headers["retry-after"].isdigit()


@pytest.mark.parametrize("body", [b"", b"{", b"[1]", b'{"prompt": "no model"}',
                                  b'{"model": 7}', b"\xff\xfe", b"[" * 50_000])
def test_malformed_bodies_are_a_400_json(gateway, body):
    answer = httpx.post(gateway.url + "/v1/completions", content=body,
                        headers={"Authorization": f"Bearer {SECRET}"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_wrong_methods_and_paths_get_openai_errors(gateway):
    auth = {"Authorization": f"Bearer {SECRET}"}
    wrong_method = httpx.get(gateway.url + "/v1/completions", headers=auth)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    no_such = httpx.post(gateway.url + "/v1/embeddings", headers=auth, json={})
    assert no_such.status_code == 404
    assert set(json.loads(no_such.content)["error"]) == {"message", "type", "param", "code"}
