"""A bounded ring of output lines per replica, in chunks (pure: no Django, time passed in).

The portal keeps each replica's recent output in the cache as a small index plus up to
MAX_CHUNKS chunks of at most CHUNK_LINES lines and CHUNK_CHARS characters: an append
rewrites the index and the newest chunk or two, never the whole ring, and following the
output reads one or two chunks. Kept: the last 7 to 8 chunks, i.e. about the last 1,000
lines or 256 KiB, whichever is fewer.

Shapes (plain lists, so a code change never meets an old pickled class):
- index: {"next": seq of the next line, "chunks": [[chunk number, its first seq], ...]}
- chunk: [[seq, at_s, text], ...]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from serving.agent.logs import MAX_BYTES_PER_HEARTBEAT, clean_line
from swarm_protocol.agent_messages import MAX_LOG_LINES

CHUNK_LINES = 125
CHUNK_CHARS = 32 * 1024
MAX_CHUNKS = 8
# What makes a line the replica's "last error" on the replica list: log levels, Python's
# traceback header and exception names.
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL|Traceback|\w*(Error|Exception))\b")

Index = dict[str, Any]
Chunk = list[list[Any]]


@dataclass
class RingWrite:
    """What one append changes: the new index, chunks to write, chunk numbers to delete."""

    index: Index
    chunks: dict[int, Chunk] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)


def empty_index() -> Index:
    return {"next": 1, "chunks": []}


def valid_index(index: Any) -> Index:
    """Return `index` if it has the expected shape, else an empty one (a lost ring)."""
    if isinstance(index, dict) and isinstance(index.get("next"), int) \
            and isinstance(index.get("chunks"), list):
        return index
    return empty_index()


def bounded_batch(texts: list[str]) -> list[str]:
    """Return what the ring takes of one heartbeat's lines: cleaned, within the caps."""
    taken: list[str] = []
    chars = 0
    for text in texts[:MAX_LOG_LINES]:
        line = clean_line(text)
        chars += len(line)
        if chars > MAX_BYTES_PER_HEARTBEAT:
            break
        taken.append(line)
    return taken


def appended(index: Index | None, newest_chunk: Chunk | None, texts: list[str],
             at_s: float) -> RingWrite:
    """Return the write that adds `texts` at `at_s` after the ring's newest chunk.

    `newest_chunk` None (expired, or no chunk yet): the lines start a new chunk.
    """
    current_index = valid_index(index)
    chunks = [list(entry) for entry in current_index["chunks"]]
    seq = int(current_index["next"])
    written: dict[int, Chunk] = {}
    current: Chunk | None = list(newest_chunk) if chunks and newest_chunk is not None else None
    chars = sum(len(line[2]) for line in current or [])
    for text in bounded_batch(texts):
        if current is None or len(current) >= CHUNK_LINES or chars + len(text) > CHUNK_CHARS:
            chunks.append([chunks[-1][0] + 1 if chunks else 1, seq])
            current, chars = [], 0
        current.append([seq, at_s, text])
        chars += len(text)
        written[chunks[-1][0]] = current
        seq += 1
    dropped = [number for number, _ in chunks[:-MAX_CHUNKS]]
    kept = chunks[-MAX_CHUNKS:]
    return RingWrite({"next": seq, "chunks": kept},
                     {n: lines for n, lines in written.items() if n not in dropped}, dropped)


def last_error(texts: list[str], at_s: float) -> dict[str, Any] | None:
    """Return {"at_s", "text"} of the last line that looks like an error, or None."""
    for text in reversed(bounded_batch(texts)):
        if _ERROR_LINE.search(text):
            return {"at_s": at_s, "text": text}
    return None


def _start(index: Index, after: int | None) -> int | None:
    """Return the seq to read after (None: the tail); an `after` beyond the newest line
    means the ring started again (the cache lost it): read from its start."""
    if after is None:
        return None
    return 0 if after > int(index["next"]) - 1 else after


def chunks_to_read(index: Index | None, after: int | None, limit: int) -> list[int]:
    """Return the chunk numbers that hold the lines `lines_after` will answer."""
    current = valid_index(index)
    entries = current["chunks"]
    ends = [first for _, first in entries[1:]] + ([current["next"]] if entries else [])
    spans = [(number, first, end) for (number, first), end in zip(entries, ends, strict=True)]
    start = _start(current, after)
    needed: list[int] = []
    count = 0
    if start is None:  # the tail: from the newest chunk back, until `limit` lines
        for number, first, end in reversed(spans):
            if count >= limit:
                break
            needed.insert(0, number)
            count += end - first
        return needed
    for number, first, end in spans:
        if end - 1 <= start:  # every line of it was read already
            continue
        if count >= limit:
            break
        needed.append(number)
        count += end - max(first, start + 1)
    return needed


def lines_after(index: Index | None, chunks: dict[int, Chunk], after: int | None,
                limit: int) -> tuple[list[dict[str, Any]], int]:
    """Return (lines, cursor): up to `limit` lines after seq `after`, oldest first.

    `after` None: the last `limit` lines. Pass the cursor back as `after` to follow.
    """
    current = valid_index(index)
    newest = int(current["next"]) - 1
    lines = [line for number, _ in current["chunks"] for line in chunks.get(number, [])]
    start = _start(current, after)
    if start is None:
        chosen = lines[-limit:]
    else:
        chosen = [line for line in lines if line[0] > start][:limit]
    # Nothing new: stay where the reader is (or at the newest line, reading the tail or
    # after a lost ring).
    idle_cursor = newest if after is None or after > newest else after
    cursor = chosen[-1][0] if chosen else idle_cursor
    return [_shown(line) for line in chosen], cursor


def _shown(line: list[Any]) -> dict[str, Any]:
    seq, at_s, text = line
    at = datetime.fromtimestamp(at_s, UTC).isoformat().replace("+00:00", "Z")
    return {"seq": seq, "at": at, "text": text}
