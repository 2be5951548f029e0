"""What commands print: JSON for scripts (`--json`), small tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

PIPED_WIDTH = 4096

# Soft wrap: long values are not cut for narrow terminals. Piped output (grep, awk) gets
# whole lines, not rich's default 80 columns, which split sha256s and dates.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else PIPED_WIDTH)
stderr = Console(stderr=True)


@dataclass
class State:
    """Options of the root command that every subcommand reads (one command per process)."""

    json: bool = False


STATE = State()  # set by the root command's callback


def wants_json() -> bool:
    return STATE.json


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":")) if value else "-"
    return str(value)


def emit(data: Any, columns: Sequence[str] | None = None) -> None:
    """Print `data`: as JSON with --json, else a table (rows) or `key: value` lines."""
    if wants_json():
        print(json.dumps(data, indent=2, default=str))
        return
    if isinstance(data, list):
        table(data, columns)
    elif isinstance(data, dict):
        for key in columns or list(data):
            stdout.print(f"{key}: {_cell(data.get(key))}", highlight=False, markup=False)
    elif data is not None:
        stdout.print(str(data), highlight=False, markup=False)


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print rows as a table with the given columns (all of the first row's by default)."""
    if not rows:
        stderr.print("(none)", style="dim")
        return
    names = list(columns or rows[0])
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for name in names:
        grid.add_column(name, overflow="fold")
    for row in rows:
        grid.add_row(*(Text(_cell(row.get(name))) for name in names))  # no markup
    stdout.print(grid)


def note(message: str) -> None:
    """Print a message for people on stderr (scripts read only stdout)."""
    stderr.print(message, highlight=False, markup=False)
