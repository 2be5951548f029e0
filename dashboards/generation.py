"""Generation figures of a generative deployment's replicas, and their sum: pure, no Django.

The figures come from each replica's entry in its node's last heartbeat (serving/live.py;
ReplicaStatus's generation fields, present only where a heartbeat gave them). The cache may
hold what an older portal wrote, so every value is checked again here. The browser does the
same sums on live heartbeats (static/js/generation.js); these render the page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

NO_FIGURE = "\u2013"  # an en dash, as the other tiles show "unknown"
_COUNTS = ("running_sequences", "waiting_sequences")
_RATES = ("kv_cache_usage", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
          "itl_p99_ms", "queue_p50_ms")


@dataclass(frozen=True)
class GenerationFigures:
    """A replica's (or a deployment's) generation figures; None: unknown."""

    running_sequences: int | None = None
    waiting_sequences: int | None = None
    kv_cache_usage: float | None = None  # 0..1: the reserved share of the KV-cache budget
    tokens_per_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    queue_p50_ms: float | None = None

    def as_text(self) -> dict[str, str]:
        """Return each figure as the page shows it (the same as generation.js writes)."""
        text = {name: NO_FIGURE if value is None else f"{value:.1f}"
                for name, value in asdict(self).items()}
        text.update({name: NO_FIGURE if getattr(self, name) is None
                     else str(getattr(self, name)) for name in _COUNTS})
        usage = self.kv_cache_usage
        text["kv_cache_usage"] = NO_FIGURE if usage is None else f"{100 * usage:.0f}%"
        return text


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def replica_figures(status: Mapping[str, Any] | None) -> GenerationFigures:
    """Return the generation figures of a replica's heartbeat entry (all None without)."""
    status = status or {}
    values: dict[str, Any] = {name: _count(status.get(name)) for name in _COUNTS}
    values.update({name: _number(status.get(name)) for name in _RATES})
    if values["kv_cache_usage"] is not None:
        values["kv_cache_usage"] = min(values["kv_cache_usage"], 1.0)
    return GenerationFigures(**values)


def _known(values: Sequence[float | int | None]) -> list[float]:
    return [float(v) for v in values if v is not None]


def _total(values: Sequence[float | int | None]) -> float | None:
    known = _known(values)
    return sum(known) if known else None


def _mean(values: Sequence[float | int | None]) -> float | None:
    known = _known(values)
    return sum(known) / len(known) if known else None


def _worst(values: Sequence[float | int | None]) -> float | None:
    known = _known(values)
    return max(known) if known else None


def deployment_figures(replicas: Sequence[GenerationFigures]) -> GenerationFigures:
    """Return a deployment's figures from its replicas' (those reporting a figure count).

    Sequences and tokens per second add up; KV-cache use is the mean share. Percentiles
    do not add: the p50s shown are the mean of the replicas' (each replica's is over its
    last minute), the p99s the worst replica's, so a slow replica is never averaged away.
    """
    def column(name: str) -> list[Any]:
        return [getattr(r, name) for r in replicas]

    running, waiting = _total(column("running_sequences")), _total(column("waiting_sequences"))
    return GenerationFigures(
        running_sequences=None if running is None else int(running),
        waiting_sequences=None if waiting is None else int(waiting),
        kv_cache_usage=_mean(column("kv_cache_usage")),
        tokens_per_s=_total(column("tokens_per_s")),
        ttft_p50_ms=_mean(column("ttft_p50_ms")), ttft_p99_ms=_worst(column("ttft_p99_ms")),
        itl_p50_ms=_mean(column("itl_p50_ms")), itl_p99_ms=_worst(column("itl_p99_ms")),
        queue_p50_ms=_mean(column("queue_p50_ms")))
