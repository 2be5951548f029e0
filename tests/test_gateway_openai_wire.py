"""OpenAI's wire shapes at the gateway (pure): errors, `model` targets, model lists, usage."""

from __future__ import annotations

import json

import pytest

from serving.gateway.fast_asgi import is_gateway_path, starts_gateway_request
from serving.gateway.openai_wire import (
    OpenAIRequestError,
    as_openai_error,
    chat_text,
    generate_prompt,
    generative,
    model_list,
    model_target,
    openai_error,
    parse_generation_request,
    prompt_text,
    usage_tokens,
)
from serving.gateway.requests import UNKNOWN_VERSION, ModelPath
from serving.gateway.responses import error, json_response, retry_later
from serving.gateway.routes import DeploymentRoute, VersionInfo

LM = VersionInfo("transformers_causal_lm", [], [])
MLP = VersionInfo("pytorch_torchscript", [], [])


def route(weights: dict[int, float], versions: dict[int, VersionInfo]) -> DeploymentRoute:
    return DeploymentRoute(name="d", deployment_id=1, weights=weights, versions=versions)


def test_errors_have_openai_shape_and_type_by_status():
    response = openai_error(404, "no such model", param="model")
    assert response.status == 404
    assert json.loads(response.body) == {"error": {
        "message": "no such model", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}}
    assert json.loads(openai_error(401, "who?").body)["error"]["code"] == "invalid_api_key"
    assert json.loads(openai_error(503, "busy").body)["error"]["type"] == "server_error"


def test_gateway_errors_are_translated_keeping_status_and_headers():
    translated = as_openai_error(retry_later(429, "rate limit exceeded", 3))
    assert translated.status == 429
    assert (b"retry-after", b"3") in translated.headers
    assert json.loads(translated.body)["error"]["message"] == "rate limit exceeded"
    assert json.loads(translated.body)["error"]["type"] == "requests"
    # A replica's own OpenAI error and any success pass through unchanged.
    replica_error = openai_error(400, "bad temperature", param="temperature")
    assert as_openai_error(replica_error) is replica_error
    ok = json_response(200, {"error": "not an error: a 200"})
    assert as_openai_error(ok) is ok
    assert json.loads(as_openai_error(error(404, "unknown model 'x'")).body)["error"][
        "message"] == "unknown model 'x'"


def test_model_names_a_deployment_and_name_colon_n_pins_a_version():
    assert model_target("tiny") == ModelPath("tiny", None, "", "infer")
    assert model_target("tiny:2") == ModelPath("tiny", 2, "2", "infer")
    for odd in ("tiny:02", "tiny:x", "tiny:", "tiny:-1", "tiny:99999999999999999999"):
        assert model_target(odd).version == UNKNOWN_VERSION, odd


def test_a_request_needs_a_json_object_with_a_string_model():
    parsed = parse_generation_request(b'{"model": "tiny:1", "prompt": ["a", "b"], '
                                      b'"stream": true}', chat=False)
    assert parsed.target.version == 1 and parsed.prompt == "a" and parsed.stream
    chat = parse_generation_request(json.dumps({"model": "m", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]})
        .encode(), chat=True)
    assert chat.prompt == "system\nbe brief\nuser\nhi" and not chat.stream
    for body in (b"", b"{", b"[]", b'"x"', b"\xff", b'{"model": 3}', b'{"model": ""}',
                 b'{"prompt": "no model"}', b"[" * 100_000):
        with pytest.raises(OpenAIRequestError) as refused:
            parse_generation_request(body, chat=False)
        assert refused.value.response.status == 400
        assert json.loads(refused.value.response.body)["error"]["type"] == \
            "invalid_request_error"


def test_generate_prompt_reads_text_input_or_nothing():
    assert generate_prompt(b'{"text_input": "hello"}') == "hello"
    assert generate_prompt(b'{"text_input": ["one"]}') == "one"
    for body in (b"", b"[1]", b'{"text_input": 3}', b"\xff", b"[" * 100_000):
        assert generate_prompt(body) == "", body


def test_prompt_text_tolerates_any_shape():
    assert prompt_text(None) == "" and prompt_text([1, 2]) == "" and prompt_text([]) == ""
    assert chat_text("x") == "" and chat_text([1, {"role": "user", "content": [1]}]) == "user\n"


def test_generative_looks_at_the_served_versions_or_the_pinned_one():
    assert generative(route({1: 1.0}, {1: LM}))
    assert not generative(route({1: 1.0}, {1: MLP}))
    mixed = route({1: 1.0, 2: 0.0}, {1: MLP, 2: LM})
    assert not generative(mixed) and generative(mixed, 2) and not generative(mixed, 3)
    assert generative(route({}, {4: LM}))  # nothing weighted: any version with replicas


def test_model_list_is_openais_list_shape():
    listed = json.loads(model_list(["b", "a"]).body)
    assert listed == {"object": "list", "data": [
        {"id": "a", "object": "model", "created": 0, "owned_by": "swarm-portal"},
        {"id": "b", "object": "model", "created": 0, "owned_by": "swarm-portal"}]}


def test_usage_tokens_reads_total_tokens_or_nothing():
    assert usage_tokens(b'{"usage": {"total_tokens": 12}}') == 12
    for answer in (b'{"usage": null}', b"[DONE]", b"", b'{"usage": {"total_tokens": -1}}',
                   b'{"usage": {"total_tokens": true}}', b"[1]", b"{" * 10 + b"[" * 100_000):
        assert usage_tokens(answer) is None, answer


def test_v1_paths_are_the_gateways_not_the_portals():
    assert starts_gateway_request(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert starts_gateway_request(b"GET /v1/models HTTP/1.1\r\n")
    assert starts_gateway_request(b"GET /v1 HTTP/1.1\r\n") is False
    assert starts_gateway_request(b"GET /v1x HTTP/1.1\r\n") is False
    assert starts_gateway_request(b"GET /v1") is None
    assert is_gateway_path("/v1/models") and is_gateway_path("/v1/completions")
    assert not is_gateway_path("/v1") and not is_gateway_path("/v1x/models")
