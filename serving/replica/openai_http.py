"""OpenAI's `POST /v1/completions` and `POST /v1/chat/completions` at the replica.

Same engine, sampling, text and SSE code as the OIP generate endpoints
(`generation_http.py`); only the request fields (`openai_request.py`) and the answer
shapes differ. Shapes are OpenAI's: ids `cmpl-...` / `chatcmpl-...`, `object`
("text_completion", "chat.completion", "chat.completion.chunk"), `created` (Unix
seconds), `model` (the request's string), `choices` (one: index 0, `text` or
`message`/`delta`, `logprobs` null, `finish_reason` "stop" or "length") and `usage`.

Streams are `data: {chunk}` events then `data: [DONE]`. The chunk carrying the
finish_reason also carries `usage`, whatever the request said: the gateway reads it for
its token rate limits. With `stream_options.include_usage` the stream is OpenAI's
instead: `usage: null` on every chunk, then one more chunk with `choices: []` and the
usage, which is then the last chunk. As with generate_stream, the head goes out with the
engine's first event (a refusal is still a plain 4xx/5xx a gateway can retry elsewhere),
and a client that hangs up cancels the sequence.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from serving.replica.generation_engine import GenerationEvent
from serving.replica.generation_http import (
    Generation,
    Render,
    collect_text,
    error_status,
    send_events,
    usage,
)
from serving.replica.generation_runner import GenerationBackend
from serving.replica.generation_text import DEFAULT_MAX_TOKENS, GenerateInputError
from serving.replica.openai_request import OpenAIError, OpenAIRequest, error_body, parse_request

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
DONE = b"data: [DONE]\n\n"
FINISH_REASONS = ("stop", "length")


async def serve_openai(backend: GenerationBackend, body: bytes, chat: bool,
                       receive: Receive, send: Send) -> tuple[int, dict[str, Any]] | None:
    """Answer one completions (chat=False) or chat completions body.

    Return (status, JSON body) for the caller to send, or None once a stream was sent.
    """
    try:
        request = parse_request(body, chat)
        generation = start(backend, request)
    except OpenAIError as exc:
        return exc.status, exc.body()
    answer = Answer(request)
    if not request.stream:
        return await answer.whole(generation, receive)
    refused = await send_events(generation, receive, send, answer.stream_renderer(), DONE)
    return None if refused is None else (error_status(refused), engine_error(refused))


def start(backend: GenerationBackend, request: OpenAIRequest) -> Generation:
    """Return the started sequence of a checked request; raise OpenAIError."""
    param = "messages" if request.chat else "prompt"
    try:
        if request.chat:
            # The template writes the special tokens (BOS) itself.
            prompt_ids = backend.encode(backend.render_chat(request.messages),
                                        add_special_tokens=False)
        else:
            prompt_ids = backend.encode(request.prompt)
    except GenerateInputError as exc:
        code = "context_length_exceeded" if "context" in str(exc) else None
        raise OpenAIError(str(exc), param, code=code) from None
    limit = backend.max_new_tokens(prompt_ids)
    return Generation(backend, prompt_ids,
                      request.params(limit, default_max_tokens(backend, request, prompt_ids)))


def default_max_tokens(backend: GenerationBackend, request: OpenAIRequest,
                       prompt_ids: list[int]) -> int:
    """Return max_tokens when the request gives none: 16 for completions (OpenAI's
    default); for chat, the rest of the context, within what the KV-cache budget can
    reserve beside the prompt (the engine reserves prompt + max_tokens up front)."""
    if not request.chat:
        return min(DEFAULT_MAX_TOKENS, backend.max_new_tokens(prompt_ids))
    room = backend.cache_tokens_limit() - len(prompt_ids)
    return max(1, min(backend.max_new_tokens(prompt_ids), room))


def engine_error(event: GenerationEvent) -> dict[str, Any]:
    """Return OpenAI's error document for a sequence the engine refused or failed."""
    status = error_status(event)
    if status < 500:
        return error_body(event.error or "refused", param="max_tokens")
    return error_body(event.error or "failed", "server_error")


class Answer:
    """The shapes of one request's answer: its id, creation time and model string."""

    def __init__(self, request: OpenAIRequest) -> None:
        self.request = request
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    async def whole(self, generation: Generation, receive: Receive
                    ) -> tuple[int, dict[str, Any]]:
        """Return (status, body) of a non-streamed answer once the sequence ends."""
        text, event = await collect_text(generation, receive)
        if event.error:
            return error_status(event), engine_error(event)
        if event.finish_reason not in FINISH_REASONS:
            return 503, error_body("the sequence was cancelled: the replica is stopping",
                                   "server_error")
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": event.finish_reason}
        if self.request.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        kind = "chat.completion" if self.request.chat else "text_completion"
        return 200, {**self._head(kind), "choices": [choice], "usage": usage(event)}

    def stream_renderer(self) -> Render:
        """Return the function that turns each engine event into its chunks."""
        first = [True]

        def render(event: GenerationEvent) -> list[dict[str, Any]]:
            if event.error or (event.finish_reason is not None
                               and event.finish_reason not in FINISH_REASONS):
                return [engine_error(event) if event.error else error_body(
                    "the sequence was cancelled: the replica is stopping", "server_error")]
            chunks = []
            if first[0] and self.request.chat:
                chunks.append(self._chunk({"role": "assistant", "content": ""}))
            first[0] = False
            if event.text:
                chunks.append(self._chunk({"content": event.text}, text=event.text))
            if event.finish_reason is not None:
                chunks += self._final_chunks(event)
            return chunks

        return render

    def _final_chunks(self, event: GenerationEvent) -> list[dict[str, Any]]:
        final = self._chunk({}, finish_reason=event.finish_reason)
        if not self.request.include_usage:
            final["usage"] = usage(event)  # always: the gateway counts tokens from it
            return [final]
        usage_chunk = {**self._head(self._chunk_kind), "choices": [], "usage": usage(event)}
        return [final, usage_chunk]

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.request.chat else "text_completion"

    def _chunk(self, delta: dict[str, Any], text: str = "",
               finish_reason: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.request.chat:
            choice["delta"] = delta
        else:
            choice["text"] = text
        chunk = {**self._head(self._chunk_kind), "choices": [choice]}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.request.model, "system_fingerprint": None}
