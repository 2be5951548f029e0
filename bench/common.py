"""What the cell benchmarks share (bench/replica.py, gateway.py, tunnel.py, node_tls.py,
serving_path.py): their options, the load average, the median round, the report's first line
and its two-target ratio table, and stopping the processes they started.

No torch, no project imports: any bench script can import it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar


class Measured(Protocol):
    """A cell: one target at one concurrency (bench/gateway.Cell, bench/replica.Cell)."""

    @property
    def requests_per_s(self) -> float: ...


CellT = TypeVar("CellT", bound=Measured)
STOP_TIMEOUT_S = 30


def add_cell_options(parser: argparse.ArgumentParser, rounds: int = 3) -> None:
    """Add --duration-s, --warm-up-s (seconds), --rounds and --concurrency (a list)."""
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--warm-up-s", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=rounds, help="median of this many rounds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages, as `uptime` shows them."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def median_round(rounds: Sequence[CellT]) -> CellT:
    """Return the round with the median throughput (one noisy round does not decide)."""
    return sorted(rounds, key=lambda cell: cell.requests_per_s)[len(rounds) // 2]


def print_run_line(title: str, args: argparse.Namespace) -> None:
    """Print the report's first line: cell length, rounds, client, CPUs, load averages
    (`args.load_before` is load_average() taken before the run)."""
    print(f"\n{title} benchmark: {args.duration_s} s per cell, median of {args.rounds} "
          f"alternating rounds, load from {args.client}, {os.cpu_count()} CPUs, load average "
          f"{args.load_before} before and {load_average()} after\n")


def print_cell_table(cells: Iterable[Any], first_column: str, extra_columns: Sequence[str],
                     extra: Callable[[Any], Sequence[str]]) -> None:
    """Print one row per bench/gateway.Cell: target, concurrency, requests/s, p50 and p99
    (ms), errors, then `extra(cell)` under `extra_columns`."""
    print(f"| {first_column} | concurrency | requests/s | p50 ms | p99 ms | errors | "
          + "".join(f"{column} | " for column in extra_columns).rstrip())
    print("|---" * (6 + len(extra_columns)) + "|")
    for cell in cells:
        print(f"| {cell.target} | {cell.concurrency} | {cell.requests_per_s:,.0f} | "
              f"{cell.latency_ms(0.5):.3f} | {cell.latency_ms(0.99):.3f} | {cell.errors} | "
              + "".join(f"{value} | " for value in extra(cell)).rstrip())


def print_ratio_table(cells: Iterable[Any], concurrencies: Iterable[int], base: str,
                      other: str, other_label: str) -> None:
    """Print, per concurrency, `other`'s requests/s over `base`'s and the p50 difference (ms).

    `cells` are bench/gateway.Cell rows (`target`, `concurrency`, `requests_per_s`,
    `latency_ms(fraction)`), one per target and concurrency.
    """
    cells = list(cells)
    print(f"\n| concurrency | {other_label} requests/s vs {base} | "
          f"{other_label} p50 - {base} p50 |")
    print("|---|---|---|")
    for concurrency in concurrencies:
        row = {c.target: c for c in cells if c.concurrency == concurrency}
        ratio = row[other].requests_per_s / row[base].requests_per_s
        extra_ms = row[other].latency_ms(0.5) - row[base].latency_ms(0.5)
        print(f"| {concurrency} | {ratio:.2f} | {extra_ms:+.3f} ms |")


def stop(processes: Iterable[subprocess.Popen[bytes]],
         timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Terminate each process, then wait for it (at most `timeout_s` each)."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=timeout_s)
