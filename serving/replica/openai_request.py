"""Parse OpenAI completions and chat completions requests (pure: no torch, no I/O).

Field policy, one decision per field (docs/architecture.md, "OpenAI endpoints"):
- used: model (echoed back, any string), prompt (completions: a string or a list of one
  string), messages (chat), max_tokens / max_completion_tokens, temperature, top_p, seed,
  stop (a string or a list), stream, stream_options.include_usage, and two extensions
  vLLM has too: top_k and ignore_eos;
- accepted and ignored, having no effect on a single answer: user, metadata, store,
  service_tier, parallel_tool_calls, prompt_cache_key, safety_identifier;
- accepted only at their no-op values (what some clients send by default), else a 400:
  n and best_of 1, logprobs false/null, top_logprobs null, echo false, suffix null/"",
  presence_penalty and frequency_penalty 0, logit_bias null/{}, tools and functions
  null/[], tool_choice and function_call null/"none", response_format {"type": "text"};
- anything else: 400 "unrecognized request argument", as OpenAI answers.
Errors are `OpenAIError`, rendered as {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from serving.replica.generation_text import GenerateInputError, SamplingParams

USED = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                  "stream", "stream_options", "ignore_eos"})
COMPLETION_ONLY = frozenset({"prompt"})
CHAT_ONLY = frozenset({"messages", "max_completion_tokens"})
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                     "prompt_cache_key", "safety_identifier"})
# Field -> the values that change nothing (accepted); any other value is a 400.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None,),
    "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
    "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"})}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user",
              "assistant": "assistant"}  # a template that knows no "developer" knows system
MAX_MESSAGES = 1024


class OpenAIError(Exception):
    """A request OpenAI would refuse: status and OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 error_type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.error_type, self.code = status, param, error_type, code

    def body(self) -> dict[str, Any]:
        """Return OpenAI's error document."""
        return error_body(str(self), self.error_type, self.param, self.code)


def error_body(message: str, error_type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Return {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


@dataclass(frozen=True)
class OpenAIRequest:
    """A checked request: the prompt (text, or chat messages) and the sampling fields."""

    chat: bool
    model: str
    prompt: str = ""  # completions
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: role, content
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams.parse's fields
    stream: bool = False
    include_usage: bool = False

    def params(self, max_tokens_limit: int, default_max_tokens: int) -> SamplingParams:
        """Return the sampling parameters; raise OpenAIError on a bad value."""
        fields = {"max_tokens": default_max_tokens, **self.sampling}
        try:
            return SamplingParams.parse(fields, max_tokens_limit)
        except GenerateInputError as exc:
            raise OpenAIError(str(exc), _param_of(str(exc))) from None


def parse_request(body: bytes, chat: bool) -> OpenAIRequest:
    """Return the checked request of a /v1/completions (chat=False) or
    /v1/chat/completions body; raise OpenAIError."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise OpenAIError("the body must be a JSON object")
    _check_fields(request, chat)
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("model must be a non-empty string", "model")
    sampling = {name: request[name] for name in ("temperature", "top_p", "top_k", "seed",
                                                 "stop", "ignore_eos") if name in request}
    max_tokens = _max_tokens(request, chat)
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    stream, include_usage = _stream(request)
    if chat:
        return OpenAIRequest(True, model, messages=_messages(request.get("messages")),
                             sampling=sampling, stream=stream, include_usage=include_usage)
    return OpenAIRequest(False, model, prompt=_prompt(request.get("prompt")),
                         sampling=sampling, stream=stream, include_usage=include_usage)


def _check_fields(request: dict[str, Any], chat: bool) -> None:
    known = USED | IGNORED | (CHAT_ONLY if chat else COMPLETION_ONLY)
    for name, value in request.items():
        if name in known:
            continue
        if name in NO_OP_VALUES:
            if not _is_no_op(value, NO_OP_VALUES[name]):
                raise OpenAIError(f"{name}={json.dumps(value)[:80]} is not supported by "
                                  "this server", name)
            continue
        raise OpenAIError(f"Unrecognized request argument supplied: {name}", name)


def _is_no_op(value: Any, no_op_values: tuple[Any, ...]) -> bool:
    # Types compared too: True == 1 and 0 == False in Python, but n=true or logprobs=0
    # (the sampled token's log-probability) are requests for something.
    return any(value == allowed and type(value) is type(allowed) for allowed in no_op_values)


def _max_tokens(request: dict[str, Any], chat: bool) -> Any:
    value = request.get("max_tokens")
    if chat and request.get("max_completion_tokens") is not None:
        value = request["max_completion_tokens"]  # the newer name wins, as OpenAI's
    return value


def _stream(request: dict[str, Any]) -> tuple[bool, bool]:
    stream = request.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise OpenAIError("stream must be true or false", "stream")
    options = request.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise OpenAIError("stream_options is only allowed when stream is true",
                          "stream_options")
    if not isinstance(options, dict) or not set(options) <= {"include_usage",
                                                            "continuous_usage_stats"}:
        raise OpenAIError("stream_options must be an object with include_usage",
                          "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise OpenAIError("stream_options.include_usage must be true or false",
                          "stream_options")
    return stream, include_usage


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise OpenAIError("prompt must be a string (or a list of one string): batches and "
                          "token ids are not supported", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise OpenAIError("prompt must be a non-empty string", "prompt")
    return prompt


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise OpenAIError(f"at most {MAX_MESSAGES} messages", "messages")
    return [_message(message, index) for index, message in enumerate(messages)]


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise OpenAIError(f"{param} must be an object with role and content", param)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise OpenAIError(f"{param}.role must be one of {', '.join(CHAT_ROLES)} (tools are "
                          "not supported)", f"{param}.role")
    extra = set(message) - {"role", "content", "name"}
    if extra - {"refusal", "tool_calls"} or message.get("tool_calls") or message.get(
            "refusal"):
        raise OpenAIError(f"{param} has fields this server does not support: "
                          f"{', '.join(sorted(extra))}", param)
    return {"role": CHAT_ROLES[role], "content": _content(message.get("content"), param)}


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise OpenAIError(f"{param}.content: only text parts are supported",
                                  f"{param}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise OpenAIError(f"{param}.content must be a string or a list of text parts",
                      f"{param}.content")


def _param_of(message: str) -> str | None:
    """Return the field a SamplingParams message names first (its messages start so)."""
    name = message.split(" ", 1)[0]
    return name if name in USED else None
