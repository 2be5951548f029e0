"""The OIP generate extension at the replica: `generate` (one JSON answer) and
`generate_stream` (Server-Sent Events), as Triton defines them.

Request: a JSON object with `text_input` (the prompt) and sampling fields (`max_tokens`,
`temperature`, `top_p`, `top_k`, `seed`, `stop`, `ignore_eos`) at the top level or inside
`parameters`. `generate` answers {"model_name", "model_version", "text_output",
"finish_reason", "usage"}; `generate_stream` sends one `data: {...}\\n\\n` event per text
delta ({"model_name", "model_version", "text_output"}) and a last one that adds
`finish_reason` and `usage`. A malformed request is a 400 JSON answer before any event; a
client that hangs up (its connection's `http.disconnect`) cancels the sequence, which
leaves the running batch at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from serving.replica.generation_engine import GenerationEvent
from serving.replica.generation_runner import GenerationBackend
from serving.replica.generation_text import GenerateInputError, SamplingParams

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_JSON = [(b"content-type", b"application/json")]
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                    "stop_words", "ignore_eos")


def parse_generate_request(body: bytes) -> tuple[str, dict[str, Any]]:
    """Return (prompt, sampling fields) of a generate body; raise GenerateInputError."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerateInputError(f"the body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise GenerateInputError("the body must be a JSON object with text_input")
    prompt = request.get("text_input")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # Triton clients may send a one-element list
    if not isinstance(prompt, str) or not prompt:
        raise GenerateInputError("text_input must be a non-empty string")
    parameters = request.get("parameters", {})
    if not isinstance(parameters, dict):
        raise GenerateInputError("parameters must be a JSON object")
    fields = {name: request[name] for name in _SAMPLING_FIELDS if name in request}
    return prompt, {**fields, **{k: v for k, v in parameters.items()
                                 if k in _SAMPLING_FIELDS}}


class Generation:
    """One sequence seen from the event loop: its events arrive on an asyncio queue."""

    def __init__(self, backend: GenerationBackend, prompt_ids: list[int],
                 params: SamplingParams) -> None:
        assert backend.engine is not None
        self._engine = backend.engine
        self.events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(event: GenerationEvent) -> None:  # called in the engine's thread
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.seq_id = self._engine.submit(prompt_ids, params, sink)
        self.finished = False

    async def next_event(self) -> GenerationEvent:
        """Return the next delta or the end."""
        event = await self.events.get()
        self.finished = event.finish_reason is not None
        return event

    def cancel(self) -> None:
        """Cancel unless it already ended."""
        if not self.finished:
            self._engine.cancel(self.seq_id)


def start_generation(backend: GenerationBackend, body: bytes) -> Generation:
    """Return a started sequence for a generate body; raise GenerateInputError."""
    prompt, fields = parse_generate_request(body)
    prompt_ids = backend.encode(prompt)
    params = SamplingParams.parse(fields, backend.max_new_tokens(prompt_ids))
    return Generation(backend, prompt_ids, params)


def usage(event: GenerationEvent) -> dict[str, int]:
    """Return the OpenAI-style usage counts of the final event."""
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def error_status(event: GenerationEvent) -> int:
    """Return the HTTP status of a sequence the engine refused or failed."""
    return event.status or 500


async def generate_whole(generation: Generation, identity: dict[str, str],
                         receive: Receive) -> tuple[int, dict[str, Any]]:
    """Return (status, body) once the sequence ends; a hang-up cancels it."""
    text, event = await collect_text(generation, receive)
    if event.error:
        return error_status(event), {"error": event.error}
    return 200, {**identity, "text_output": text, "finish_reason": event.finish_reason,
                 "usage": usage(event)}


async def generate_stream(generation: Generation, identity: dict[str, str], receive: Receive,
                          send: Send) -> tuple[int, dict[str, Any]] | None:
    """Send the sequence as Server-Sent Events, each delta as soon as it is decoded.

    Return (status, error body) instead, before any byte is sent, when the engine refuses
    the sequence (a full queue: 503; a sequence that can never fit: 400), so that a
    gateway can retry elsewhere before the first token.
    """
    def render(event: GenerationEvent) -> list[dict[str, Any]]:
        if event.error:
            return [{"error": event.error}]
        payload: dict[str, Any] = {**identity, "text_output": event.text}
        if event.finish_reason is not None:
            payload.update(finish_reason=event.finish_reason, usage=usage(event))
        return [payload]

    refused = await send_events(generation, receive, send, render)
    return None if refused is None else (error_status(refused), {"error": refused.error})


Render = Callable[[GenerationEvent], list[dict[str, Any]]]


async def collect_text(generation: Generation, receive: Receive
                       ) -> tuple[str, GenerationEvent]:
    """Return (the whole text, the final event) once the sequence ends; a client that
    hangs up meanwhile cancels it."""
    parts: list[str] = []
    async with _cancel_on_disconnect(generation, receive):
        while (event := await generation.next_event()).finish_reason is None:
            parts.append(event.text)
    return "".join(parts) + event.text, event


async def send_events(generation: Generation, receive: Receive, send: Send, render: Render,
                      trailer: bytes = b"") -> GenerationEvent | None:
    """Send the sequence as Server-Sent Events: `data: <json>` for each payload that
    `render` makes of an event (written together), then `trailer` after the last event.

    The head is sent only with the first event, so a sequence the engine refuses (its
    first event is an error) is returned instead, before any byte, for the caller to
    answer with a status; None once the stream was sent or the client went away (which
    cancels the sequence).
    """
    async with _cancel_on_disconnect(generation, receive):
        event = await generation.next_event()
        if event.error:
            return event
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        while True:
            chunk = b"".join(b"data: " + json.dumps(payload).encode() + b"\n\n"
                             for payload in render(event))
            if event.finish_reason is not None:
                chunk += trailer
            try:
                await send({"type": "http.response.body", "more_body": True, "body": chunk})
            except OSError:  # the client went away mid-write
                generation.cancel()
                return None
            if event.finish_reason is not None:
                break
            event = await generation.next_event()
    await send({"type": "http.response.body", "body": b""})
    return None


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(generation: Generation, receive: Receive):  # type: ignore[no-untyped-def]
    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        generation.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        generation.cancel()
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
