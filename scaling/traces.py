"""Load traces for the simulator: a CSV file or a seeded built-in pattern (pure: no Django).

A trace is a step function of the request rate: each (timestamp_s, requests_per_s)
point holds until the next one.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER = ("timestamp_s", "requests_per_s")
PATTERNS = ("steady", "burst", "diurnal")
DAY_S = 86_400


@dataclass(frozen=True)
class Trace:
    """Request rate over time as a step function."""

    times_s: tuple[float, ...]  # strictly increasing, first >= 0
    rates_per_s: tuple[float, ...]
    duration_s: float
    name: str = "trace"

    def __post_init__(self) -> None:
        if not self.times_s or len(self.times_s) != len(self.rates_per_s):
            raise ValueError("times_s and rates_per_s: need the same, non-zero length")
        if self.duration_s <= self.times_s[-1]:
            raise ValueError("duration_s: must be after the last timestamp")

    def rates_at(self, starts_s: np.ndarray) -> np.ndarray:
        """Return the rate in force at each of `starts_s` (0 before the first point)."""
        index = np.searchsorted(np.asarray(self.times_s), starts_s, side="right") - 1
        rates = np.asarray(self.rates_per_s)[np.clip(index, 0, None)]
        return np.where(index >= 0, rates, 0.0)

    @property
    def mean_rate_per_s(self) -> float:
        """Return the time-weighted mean request rate."""
        edges = np.append(np.asarray(self.times_s), self.duration_s)
        return float(np.dot(np.diff(edges), self.rates_per_s) / (self.duration_s - edges[0]))


def load_trace_csv(path: str | Path) -> Trace:
    """Return the trace in a `timestamp_s,requests_per_s` CSV; raise ValueError on bad rows."""
    path = Path(path)
    with path.open(newline="") as handle:
        rows = [(number, row) for number, row in enumerate(csv.reader(handle), start=1)
                if any(cell.strip() for cell in row)]
    if rows and tuple(cell.strip() for cell in rows[0][1]) == HEADER:
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{path}: no rows; want a header {','.join(HEADER)} and data rows")
    points = [_parse_row(path, number, row) for number, row in rows]
    _check_order(path, [(number, t) for (number, _), (t, _) in zip(rows, points, strict=True)])
    times = tuple(t for t, _ in points)
    # The last rate holds for one more step, as long as the step before it.
    last_step_s = times[-1] - times[-2] if len(times) > 1 else 1.0
    return Trace(times, tuple(r for _, r in points), times[-1] + last_step_s, name=path.name)


def _parse_row(path: Path, number: int, row: list[str]) -> tuple[float, float]:
    if len(row) != 2:
        raise ValueError(f"{path} line {number}: want 2 columns "
                         f"({','.join(HEADER)}), got {len(row)}: {row!r}")
    timestamp_s = _number(path, number, HEADER[0], row[0])
    rate_per_s = _number(path, number, HEADER[1], row[1])
    if timestamp_s < 0 or rate_per_s < 0:
        raise ValueError(f"{path} line {number}: values must be >= 0, got {row!r}")
    return timestamp_s, rate_per_s


def _number(path: Path, number: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path} line {number}: {column} {text.strip()!r} "
                         "is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{path} line {number}: {column} {text.strip()!r} is not finite")
    return value


def _check_order(path: Path, numbered_times: list[tuple[int, float]]) -> None:
    for (_, before), (number, after) in itertools.pairwise(numbered_times):
        if after <= before:
            raise ValueError(f"{path} line {number}: timestamp_s {after:g} is not after "
                             f"{before:g}; rows must be in increasing time order")


def builtin_trace(name: str, duration_s: int, seed: int, *,
                  base_rate_per_s: float = 100.0) -> Trace:
    """Return a seeded per-second trace of `name` (steady, burst, diurnal) around a base rate."""
    if name not in PATTERNS:
        raise ValueError(f"pattern: unknown {name!r}; choose one of {', '.join(PATTERNS)}")
    if duration_s < 1:
        raise ValueError(f"duration_s: must be >= 1, got {duration_s}")
    rng = np.random.default_rng(seed)
    shape = {"steady": _steady, "burst": _burst, "diurnal": _diurnal}[name](duration_s, rng)
    rates = np.clip(shape * base_rate_per_s, 0.0, None)
    return Trace(tuple(float(t) for t in range(duration_s)), tuple(rates.tolist()),
                 float(duration_s), name=name)


def _steady(duration_s: int, rng: np.random.Generator) -> np.ndarray:
    # Per-minute levels joined by straight lines: steady traffic drifts rather than
    # jumping every second (the per-second jitter comes from Poisson arrivals).
    minutes = duration_s // 60 + 2
    levels = 1.0 + rng.normal(0.0, 0.05, minutes)
    return np.interp(np.arange(duration_s) / 60.0, np.arange(minutes), levels)


def _burst(duration_s: int, rng: np.random.Generator) -> np.ndarray:
    """Return a flat base with sudden bursts of 3-6x lasting one to five minutes."""
    factor = np.ones(duration_s)
    # At least one burst however short the trace, about one every 30 minutes.
    for _ in range(max(1, duration_s // 1800)):
        length_s = int(min(rng.uniform(60, 300), max(10, duration_s // 5)))
        start_s = int(rng.uniform(0.1, 0.9) * max(1, duration_s - length_s))
        # Overlapping bursts take the larger factor rather than multiplying.
        burst = factor[start_s:start_s + length_s]
        np.maximum(burst, rng.uniform(3.0, 6.0), out=burst)
    shape: np.ndarray = _steady(duration_s, rng) * factor
    return shape


def _diurnal(duration_s: int, rng: np.random.Generator) -> np.ndarray:
    """Return a daily cycle: a trough near 04:00, a peak near 16:00, plus drift."""
    hours = np.arange(duration_s) / 3600.0
    cycle = 1.0 + 0.7 * np.sin(2 * np.pi * (hours - 10.0) / 24.0)
    shape: np.ndarray = cycle * _steady(duration_s, rng)
    return shape
