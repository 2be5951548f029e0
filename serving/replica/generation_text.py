"""Sampling parameters of a generate request, and the text a sequence streams out.

Pure (no torch): `SamplingParams.parse` turns a request's JSON into checked parameters
(GenerateInputError -> 400), and `TextStream` turns the decoded text of the tokens generated
so far into the deltas a client receives, holding back what may still change: a trailing
incomplete UTF-8 character (decoded as U+FFFD) and a tail that could begin a stop string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 200
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default
REPLACEMENT_CHAR = "\ufffd"


class GenerateInputError(ValueError):
    """A malformed generate request; the message is for the client (400)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens and when it stops."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        """Return whether decoding takes the most likely token every time."""
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def parse(cls, values: dict[str, Any], max_tokens_limit: int) -> SamplingParams:
        """Return checked parameters from a request's fields; raise GenerateInputError."""
        return cls(
            max_tokens=_int(values, "max_tokens", DEFAULT_MAX_TOKENS, 1, max_tokens_limit),
            temperature=_float(values, "temperature", 0.0, 0.0, 100.0),
            top_p=_top_p(values),
            top_k=_int(values, "top_k", 0, 0, 1_000_000),
            seed=_seed(values),
            stop=_stop(values.get("stop", values.get("stop_words"))),
            ignore_eos=_bool(values, "ignore_eos"))


def _int(values: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = values.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise GenerateInputError(f"{name} must be an integer from {low} to {high}")
    return value


def _float(values: dict[str, Any], name: str, default: float, low: float,
           high: float) -> float:
    value = values.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not low <= value <= high:
        raise GenerateInputError(f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def _top_p(values: dict[str, Any]) -> float:
    top_p = _float(values, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise GenerateInputError("top_p must be greater than 0 and at most 1")
    return top_p


def _seed(values: dict[str, Any]) -> int | None:
    seed = values.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise GenerateInputError("seed must be a non-negative integer below 2**63")
    return seed


def _bool(values: dict[str, Any], name: str) -> bool:
    value = values.get(name, False)
    if not isinstance(value, bool):
        raise GenerateInputError(f"{name} must be true or false")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise GenerateInputError(f"stop must be a string or a list of at most "
                                 f"{MAX_STOP_STRINGS} non-empty strings of at most "
                                 f"{MAX_STOP_CHARS} characters")
    return tuple(stops)


class TextStream:
    """The text one sequence has sent so far, and the stop strings it watches for."""

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self.stop = stop
        self.sent = ""  # what the client has received
        self.stopped = False

    def update(self, text: str) -> str:
        """Return the new delta to send, given the decoded text of all generated tokens.

        Sets `stopped` once a stop string appears; the text is then cut before it.
        """
        end = self._stop_at(text)
        if end is not None:
            self.stopped = True
            return self._advance(text[:end])
        safe = text.rstrip(REPLACEMENT_CHAR) if text.endswith(REPLACEMENT_CHAR) else text
        return self._advance(safe[:len(safe) - self._held_back(safe)])

    def flush(self, text: str) -> str:
        """Return the rest to send when the sequence ends without a stop string."""
        if self.stopped:
            return ""
        end = self._stop_at(text)
        return self._advance(text if end is None else text[:end])

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            # A tokenizer may rewrite earlier characters (a U+FFFD completed): never resend.
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def _stop_at(self, text: str) -> int | None:
        # Search only from where a stop string could still start in the unsent part.
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        found = [index for s in self.stop if (index := text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Return how many trailing characters could be the start of a stop string."""
        for length in range(min(len(text), max((len(s) for s in self.stop), default=0)),
                            0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0
