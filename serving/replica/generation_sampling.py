"""Pick each sequence's next token from its logits: greedy, or sampled with its own seed.

Every sequence samples from its own `torch.Generator` (seeded from the request, or from
the OS when it gives none), so a seeded request draws the same tokens whether it runs
alone or next to others. Temperature, then top-k, then top-p (nucleus) filtering, as
Hugging Face's and vLLM's samplers order them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from serving.replica.generation_text import SamplingParams


class Sampled(Protocol):
    """What the sampler needs of a sequence."""

    params: SamplingParams
    generator: Any


def make_generator(seed: int | None) -> Any:
    """Return a CPU torch.Generator seeded with `seed` (or from the OS)."""
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def choose_tokens(logits: Any, sequences: Sequence[Sampled]) -> list[int]:
    """Return one token id per row of `logits` [rows, vocab], row i for sequences[i]."""
    greedy = logits.argmax(dim=-1).tolist()
    chosen = []
    for row, seq in enumerate(sequences):
        if seq.params.greedy:
            chosen.append(int(greedy[row]))
        else:
            chosen.append(sample_row(logits[row], seq.params, seq.generator))
    return chosen


def sample_row(logits: Any, params: SamplingParams, generator: Any) -> int:
    """Return a token drawn from one row of logits [vocab] under the parameters."""
    import torch

    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        threshold = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        ordered, order = torch.sort(probabilities, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the better tokens
        ordered = ordered.masked_fill(before >= params.top_p, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
    token = torch.multinomial(probabilities.cpu(), 1, generator=generator)
    return int(token.item())
