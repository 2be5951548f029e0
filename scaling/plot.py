"""A PNG of a simulation: load, replicas and latency over time (no Django, no pyplot)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from scaling.simulator import SimulationResult

# More points than this only blur the lines and slow the drawing down.
MAX_POINTS = 2000


def write_plot(result: SimulationResult, path: str | Path) -> None:
    """Write three stacked panels (load, replicas, latency) to a PNG at `path`."""
    # The Figure API draws with Agg and leaves pyplot's global state alone, so this
    # is safe inside a server process.
    from matplotlib.figure import Figure

    per_bucket = max(1, math.ceil(len(result.load_per_s) / MAX_POINTS))
    hours = result.duration_s > 3 * 3600
    times = _bucketed(np.arange(len(result.load_per_s)) * result.tick_s, per_bucket, "min")
    times = times / 3600.0 if hours else times
    figure = Figure(figsize=(12, 8), layout="constrained")
    load_axes, replica_axes, latency_axes = figure.subplots(3, 1, sharex=True)
    load_axes.plot(times, _bucketed(result.load_per_s, per_bucket, "mean"), lw=0.8)
    load_axes.set_ylabel("load (requests/s)")
    replica_axes.step(times, _bucketed(result.replicas, per_bucket, "max"), where="post", lw=0.8)
    replica_axes.set_ylabel("replicas")
    _mark_panic(replica_axes, result, hours)
    _plot_latency(latency_axes, times, result, per_bucket)
    latency_axes.set_xlabel("time (h)" if hours else "time (s)")
    figure.suptitle(f"{result.trace_name}: cost {result.total_cost:.2f}, "
                    f"{result.late_fraction:.2%} over {result.target_latency_s:g} s, "
                    f"{result.scale_event_count} scale events")
    figure.savefig(Path(path), format="png", dpi=100)


def _bucketed(values: object, per_bucket: int, how: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    padded = np.pad(array, (0, -len(array) % per_bucket), mode="edge")
    buckets = padded.reshape(-1, per_bucket)
    reduced: np.ndarray
    if how == "mean":
        reduced = buckets.mean(axis=1)
    else:
        reduced = buckets.max(axis=1) if how == "max" else buckets.min(axis=1)
    return reduced


def _mark_panic(axes: Axes, result: SimulationResult, hours: bool) -> None:
    panic = [(e.time_s / 3600.0 if hours else e.time_s, e.to_replicas)
             for e in result.events if e.panic]
    if panic:
        xs, ys = zip(*panic, strict=True)
        axes.scatter(xs, ys, s=12, color="tab:red", label="panic", zorder=3)
        axes.legend(loc="upper right")


def _plot_latency(axes: Axes, times: np.ndarray, result: SimulationResult,
                  per_bucket: int) -> None:
    latency = _bucketed(result.latency_s, per_bucket, "max")
    # Requests held at zero replicas have no finite estimate: draw them at the top.
    finite = latency[np.isfinite(latency)]
    ceiling = max(10 * result.target_latency_s, float(finite.max()) if finite.size else 1.0)
    axes.plot(times, np.minimum(latency, ceiling), lw=0.8)
    axes.axhline(result.target_latency_s, color="tab:orange", ls="--", lw=0.8,
                 label=f"target {result.target_latency_s:g} s")
    axes.set_yscale("log")
    axes.set_ylabel("latency estimate (s)")
    axes.legend(loc="upper right")
