"""The replica backend of hf_causal_lm versions: load the model, run the generation engine.

Loads through the archive inspector and `swarm_protocol.model_loading.load_causal_lm`
like every other format, then starts the continuous-batching engine
(`generation_engine.py`) in its own thread. The generate endpoints
(`generation_http.py`) talk to that engine directly; `forward` serves the plain OIP
`infer` endpoint too (text_input BYTES rows in, text_output BYTES rows out, greedy, at
most DEFAULT_MAX_TOKENS each), by submitting one sequence per row and waiting.

Engine limits come from the environment, checked at load (LoadError names the variable):
SWARM_REPLICA_MAX_SEQUENCES (running batch, default 16), SWARM_REPLICA_MAX_CACHE_TOKENS
(KV budget in tokens, default 32768) and SWARM_REPLICA_PREFILL_CHUNK_TOKENS (default 64).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serving.replica.artifact_backend import ArtifactBackend
from serving.replica.generation_engine import GenerationEngine, GenerationEvent
from serving.replica.generation_metrics import GenerationObserver
from serving.replica.generation_scheduler import GenerationLimits
from serving.replica.generation_text import GenerateInputError, SamplingParams
from serving.replica.runner import LoadError, ModelFailure
from swarm_protocol.archive import FORMAT_HF_CAUSAL_LM
from swarm_protocol.archive_hf import TEXT_SIGNATURE
from swarm_protocol.signature import Signature

__all__ = ["TEXT_SIGNATURE", "GenerationBackend", "limits_from_environment"]
LIMIT_ENV = {"max_running": "SWARM_REPLICA_MAX_SEQUENCES",
             "max_cache_tokens": "SWARM_REPLICA_MAX_CACHE_TOKENS",
             "prefill_chunk_tokens": "SWARM_REPLICA_PREFILL_CHUNK_TOKENS"}
INFER_TIMEOUT_S = 300.0


def limits_from_environment(environ: Mapping[str, str]) -> GenerationLimits:
    """Return the engine limits; raise LoadError naming a malformed variable."""
    values: dict[str, int] = {}
    for field_name, variable in LIMIT_ENV.items():
        raw = environ.get(variable)
        if raw is None or raw == "":
            continue
        if not raw.isdigit() or int(raw) < 1:
            raise LoadError(f"{variable} must be a whole number of at least 1, got {raw!r}")
        values[field_name] = int(raw)
    return GenerationLimits(**values)


class GenerationBackend(ArtifactBackend):
    """A causal LM behind the generation engine (runner.Backend for hf_causal_lm)."""

    artifact_format = FORMAT_HF_CAUSAL_LM

    def __init__(self, artifact_path: str, device: str, signature: Signature,
                 threads: int) -> None:
        super().__init__(artifact_path, device, signature, threads)
        self.engine: GenerationEngine | None = None
        self.context_tokens = 0
        # Added before load() (the app's Prometheus export); the engine calls them.
        self.observers: list[GenerationObserver] = []

    def load(self) -> None:
        """Inspect and load the archive, then start the engine; raise LoadError."""
        limits = limits_from_environment(os.environ)
        archive = self.inspected()
        import torch

        from swarm_protocol.model_loading import load_causal_lm

        torch.set_num_threads(self.threads)
        model, tokenizer = load_causal_lm(archive, self.device)
        assert archive.hf is not None
        self.context_tokens = archive.hf.context_tokens or int(
            getattr(tokenizer, "model_max_length", 0) or 2048)
        self.engine = GenerationEngine(model, tokenizer, limits, observers=self.observers)
        self.engine.start()

    def stop(self) -> None:
        """End the engine thread."""
        if self.engine is not None:
            self.engine.stop()

    def counts(self) -> dict[str, Any]:
        """Return the engine's counts ({} before load)."""
        return self.engine.counts() if self.engine is not None else {}

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Return the prompt's token ids; raise GenerateInputError when it cannot run.

        A chat prompt rendered by the template already holds its special tokens (BOS):
        encode it with add_special_tokens=False, or BOS comes twice.
        """
        assert self.engine is not None, "load() first"
        if not prompt.isascii():
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:  # JSON's "\ud800": the tokenizer raises TypeError
                raise GenerateInputError("the prompt is not valid Unicode (a lone "
                                         "surrogate)") from None
        encoded = self.engine.tokenizer(prompt, add_special_tokens=add_special_tokens)
        ids = [int(i) for i in encoded.input_ids]
        if not ids:
            raise GenerateInputError("the prompt is empty")
        if len(ids) >= self.context_tokens:
            raise GenerateInputError(f"the prompt has {len(ids)} tokens; the model's context "
                                     f"is {self.context_tokens}")
        return ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Return the chat prompt: the tokenizer's chat template with the generation
        prompt, or PLAIN_CHAT's lines without one; raise GenerateInputError when the
        template refuses the messages (many templates raise on roles out of order)."""
        assert self.engine is not None, "load() first"
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return plain_chat(messages)
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except TemplateError as exc:
            raise GenerateInputError(f"the model's chat template refused the messages: "
                                     f"{exc}") from None
        return str(text)

    def cache_tokens_limit(self) -> int:
        """Return the engine's KV-cache budget in tokens."""
        assert self.engine is not None, "load() first"
        return self.engine.scheduler.limits.max_cache_tokens

    def max_new_tokens(self, prompt_ids: list[int]) -> int:
        """Return how many tokens may follow the prompt within the context."""
        return max(1, self.context_tokens - len(prompt_ids))

    def forward(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return text_output rows for text_input rows (greedy; the infer endpoint)."""
        assert self.engine is not None, "load() first"
        prompts = [_text(value) for value in np.asarray(arrays[0]).reshape(-1)]
        finished: list[threading.Event] = []
        results: list[list[GenerationEvent]] = []
        for prompt in prompts:
            try:
                ids = self.encode(prompt or " ")
            except GenerateInputError as exc:
                raise ModelFailure(str(exc)) from None
            done, events = threading.Event(), list[GenerationEvent]()
            finished.append(done)
            results.append(events)
            self.engine.submit(ids, SamplingParams(), _collector(events, done))
        texts = []
        for done, events in zip(finished, results, strict=True):
            if not done.wait(INFER_TIMEOUT_S) or events[-1].error:
                raise ModelFailure(events[-1].error if events else "generation timed out")
            texts.append("".join(event.text for event in events).encode())
        return [np.array(texts, dtype=object).reshape(-1, 1)]


def plain_chat(messages: list[dict[str, str]]) -> str:
    """Return the fallback chat prompt of a model without a template: one
    `role: content` line per message, then `assistant:` for the answer."""
    lines = [f"{message['role']}: {message['content']}\n" for message in messages]
    return "".join(lines) + "assistant:"


def _collector(events: list[GenerationEvent], done: threading.Event) -> Any:
    def sink(event: GenerationEvent) -> None:
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    return sink


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
