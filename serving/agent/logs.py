"""A replica's recent output: new lines read by offset from its stdout and stderr files.

The agent pushes these lines with its heartbeat (the portal never connects to a worker,
which may sit behind NAT), so each read is bounded: at most MAX_LINES_PER_HEARTBEAT lines
and MAX_BYTES_PER_HEARTBEAT bytes per replica, lines cut at MAX_LINE_CHARS, control
characters escaped. Lines stay pending until a heartbeat that carried them got through.
The files themselves are capped (MAX_FILE_BYTES): a chatty model cannot fill the disk.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from swarm_protocol.agent_messages import MAX_LOG_LINE_CHARS, MAX_LOG_LINES

STDOUT_FILE = "stdout.log"
STDERR_FILE = "stderr.log"
ROTATED_SUFFIX = ".1"  # the previous part of a capped file (its last KEEP_ON_ROTATE_BYTES)
MAX_LINE_CHARS = MAX_LOG_LINE_CHARS
MAX_LINES_PER_HEARTBEAT = MAX_LOG_LINES
MAX_BYTES_PER_HEARTBEAT = 32 * 1024
MAX_FILE_BYTES = 8 * 1024 * 1024
KEEP_ON_ROTATE_BYTES = 1024 * 1024
# Further behind than this, the reader jumps to the last part: the portal keeps no more
# than ~256 KiB per replica anyway, and a model printing fast must not cost a slow catch-up.
SKIP_AHEAD_BYTES = 256 * 1024
_MAX_LINE_BYTES = 4 * MAX_LINE_CHARS  # a UTF-8 character is at most 4 bytes
# C0 and C1 controls but tab, DEL, and the bidirectional overrides ("Trojan Source"): none
# may reach a terminal (`swarm logs`) or a page as what it is.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
CUT_MARK = "…"


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean_line(text: str) -> str:
    """Return `text` safe to show: controls escaped (\\x1b), at most MAX_LINE_CHARS.

    Idempotent, so the portal applies it again to whatever an agent sent.
    """
    cleaned = _UNSAFE.sub(_escaped, text.removesuffix("\r"))
    if len(cleaned) > MAX_LINE_CHARS:
        cleaned = cleaned[:MAX_LINE_CHARS - len(CUT_MARK)] + CUT_MARK
    return cleaned


def _decode(raw: bytes) -> str:
    return clean_line(raw.decode("utf-8", errors="replace"))


def skipped_line(count_bytes: int) -> str:
    """Return the line that stands for output the reader jumped over."""
    return f"[swarm: {count_bytes} bytes of output skipped]"


@dataclass
class _Stream:
    """One output file: how far it was read, and an unfinished last line."""

    path: Path
    offset: int
    partial: bytes = b""
    discarding: bool = False  # inside an over-long line: drop bytes until its newline

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0


class LogTail:
    """New output lines of one replica, with what the portal has not acknowledged yet."""

    def __init__(self, replica_dir: Path, max_file_bytes: int = MAX_FILE_BYTES) -> None:
        # From the current end: what a previous run of this replica id (or the previous
        # agent, for an adopted replica) wrote was sent then, or is not ours to send.
        self._streams = [_Stream(replica_dir / name, 0) for name in (STDOUT_FILE, STDERR_FILE)]
        for stream in self._streams:
            stream.offset = stream.size()
        self._max_file_bytes = max_file_bytes
        self.pending: list[str] = []

    def collect(self) -> list[str]:
        """Read new lines into `pending` (bounded), cap the files; return a copy of it."""
        for stream in self._streams:
            budget_lines = MAX_LINES_PER_HEARTBEAT - len(self.pending)
            budget_bytes = MAX_BYTES_PER_HEARTBEAT - sum(len(line) for line in self.pending)
            if budget_lines > 0 and budget_bytes > 0:
                self.pending.extend(_read_lines(stream, budget_lines, budget_bytes))
            self._cap(stream)
        return list(self.pending)

    def acknowledge(self, count: int) -> None:
        """Forget the first `count` pending lines: a heartbeat carried them to the portal."""
        del self.pending[:count]

    def _cap(self, stream: _Stream) -> None:
        """Keep the file under the cap: its tail goes to `<name>.1`, the file restarts empty.

        The replica writes with O_APPEND (see processes.launch_replica), so its next write
        lands at the new end. Output written between the copy and the truncation is lost.
        """
        size = stream.size()
        if size <= self._max_file_bytes:
            if stream.offset > size:  # truncated by someone else: start over
                stream.offset, stream.partial = 0, b""
            return
        rotated = stream.path.with_name(stream.path.name + ROTATED_SUFFIX)
        with contextlib.suppress(OSError):
            with stream.path.open("rb") as source:
                source.seek(max(size - KEEP_ON_ROTATE_BYTES, 0))
                rotated.write_bytes(source.read(KEEP_ON_ROTATE_BYTES))
            os.truncate(stream.path, 0)
            if stream.offset < size:
                self.pending.append(skipped_line(size - stream.offset))
            stream.offset, stream.partial, stream.discarding = 0, b"", False


def _read_lines(stream: _Stream, max_lines: int, max_bytes: int) -> list[str]:
    """Return up to `max_lines` complete lines (at most ~`max_bytes`) after the offset."""
    lines: list[str] = []
    size = stream.size()
    if size - stream.offset > SKIP_AHEAD_BYTES:
        # Land inside a line: drop up to the next newline, so no line starts mid-way.
        lines.append(skipped_line(size - MAX_BYTES_PER_HEARTBEAT - stream.offset))
        stream.offset, stream.partial = size - MAX_BYTES_PER_HEARTBEAT, b""
        stream.discarding = True
    if size <= stream.offset:
        return lines
    try:
        with stream.path.open("rb") as source:
            source.seek(stream.offset)
            chunk = source.read(min(max_bytes, size - stream.offset))
    except OSError:
        return lines
    used = 0
    while used < len(chunk) and len(lines) < max_lines:
        end = chunk.find(b"\n", used)
        piece = chunk[used:] if end < 0 else chunk[used:end + 1]
        used += len(piece)
        line = _take(stream, piece)
        if line is not None:
            lines.append(line)
    stream.offset += used
    return lines


def _take(stream: _Stream, piece: bytes) -> str | None:
    """Add one piece (a line with its newline, or the unfinished end); return a full line."""
    ended = piece.endswith(b"\n")
    if stream.discarding:
        stream.discarding = not ended
        return None
    stream.partial += piece
    if ended:
        line, stream.partial = stream.partial[:-1], b""
        return _decode(line)
    if len(stream.partial) > _MAX_LINE_BYTES:  # no newline for a long while: cut it here
        line, stream.partial, stream.discarding = stream.partial, b"", True
        return _decode(line[:_MAX_LINE_BYTES] + CUT_MARK.encode())
    return None
