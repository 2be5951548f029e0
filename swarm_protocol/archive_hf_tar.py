"""A tar read in one forward pass, with what it declares and what it inflates both bounded.

Inspecting a compressed tar through `tarfile.open(mode="r:*")` let a small `.tar.gz`
cost seconds of CPU: skipping a member's data inflates it, and reading an earlier member
again seeks back, which re-inflates the stream from its start. So the stream is read
once, forward only (`tarfile`'s "r|" mode refuses a backward seek), and refused as soon as
the running total of declared member sizes passes the smaller of
`ARCHIVE_MAX_UNCOMPRESSED_BYTES` and `ARCHIVE_MAX_RATIO` times the compressed file size
(a compressed archive declaring over `ratio_min_entry_bytes`; zip entries get the same
ratio rule in archive.py). The bytes actually inflated are bounded too, by the declared
total plus a little for headers: a pax or GNU long-name header is read whole by `tarfile`
and counted in no member's size, so without this bound it could inflate gigabytes.

No Django and no torch: the validation child and the replica import it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import IO, TYPE_CHECKING, cast

from swarm_protocol.archive_export import ArchiveRefused

if TYPE_CHECKING:
    from swarm_protocol.archive import ArchiveLimits

# Headers, padding and the end-of-archive blocks are inflated but declared by no member:
# a fixed allowance plus one per member (a header block, padding, a short pax record).
HEADER_SLACK_BYTES = 1024**2
MEMBER_SLACK_BYTES = 4096
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
_INFLATE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


class BoundedReader:
    """A read-only stream that refuses to give out more than `budget_bytes` in all."""

    def __init__(self, stream: IO[bytes], budget_bytes: int) -> None:
        self.stream = stream
        self.budget_bytes = budget_bytes
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        """Return up to `size` bytes; raise ArchiveRefused once the budget is passed."""
        allowed = self.budget_bytes - self.read_bytes + 1  # one more, to see it is passed
        data = self.stream.read(allowed if size < 0 else min(size, allowed))
        self.read_bytes += len(data)
        if self.read_bytes > self.budget_bytes:
            raise ArchiveRefused(
                f"the archive inflates to more than its members declare ({self.budget_bytes}"
                " bytes read, headers included); it is refused as a decompression bomb")
        return data


def compression(head: bytes) -> str:
    """Return "gzip", "bzip2", "xz" or "" (a plain tar) from a file's first bytes."""
    return next((name for magic, name in _MAGIC if head.startswith(magic)), "")


def declared_limit(compressed: bool, file_bytes: int, limits: ArchiveLimits) -> tuple[int, str]:
    """Return (most bytes the members may declare in all, the refusal naming that limit)."""
    limit = limits.max_uncompressed_bytes
    ratio_bytes = max(limits.max_ratio * file_bytes, limits.ratio_min_entry_bytes)
    if compressed and ratio_bytes < limit:
        return int(ratio_bytes), (
            f"the archive declares more than {int(ratio_bytes)} bytes uncompressed, over "
            f"{limits.max_ratio:g} times its {file_bytes} compressed bytes (ARCHIVE_MAX_RATIO)")
    return limit, f"the archive holds more than {limit} bytes (ARCHIVE_MAX_UNCOMPRESSED_BYTES)"


@contextmanager
def forward_tar(source: str | IO[bytes], limits: ArchiveLimits
                ) -> Iterator[Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]]:
    """Yield an iterator of (archive, member), one pass, with every size limit applied.

    Each member's data may be read (`archive.extractfile(member)`) before the iterator
    moves on, never after. Raise ArchiveRefused on a corrupt stream, more than
    `limits.max_entries` members, or more bytes declared or inflated than allowed.
    """
    with ExitStack() as stack:
        reader, archive, kind, file_bytes = _open_stream(source, stack)
        yield _members(archive, reader, declared_limit(bool(kind), file_bytes, limits),
                       limits.max_entries)


def _open_stream(source: str | IO[bytes], stack: ExitStack
                 ) -> tuple[BoundedReader, tarfile.TarFile, str, int]:
    """Return (the bounded plain stream, the tar read from it, compression, file bytes)."""
    # Both are closed by the caller's ExitStack (a caller's own file is left open).
    raw = stack.enter_context(open(source, "rb")) if isinstance(source, str) else source  # noqa: SIM115
    raw.seek(0)
    kind = compression(raw.read(6))
    raw.seek(0, os.SEEK_END)
    file_bytes = raw.tell()
    raw.seek(0)
    plain = _decompressed(raw, kind)
    if plain is not raw:
        stack.callback(plain.close)  # closes the decompressor, never the caller's file
    reader = BoundedReader(plain, HEADER_SLACK_BYTES)  # the first header, read by open()
    try:
        archive = tarfile.open(fileobj=cast(IO[bytes], reader), mode="r|")  # noqa: SIM115
    except _INFLATE_ERRORS as exc:
        raise ArchiveRefused(f"the file is neither a tar nor a zip archive: {exc}") from None
    stack.enter_context(archive)
    return reader, archive, kind, file_bytes


def _decompressed(raw: IO[bytes], kind: str) -> IO[bytes]:
    if kind == "gzip":
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if kind == "bzip2":
        return cast(IO[bytes], bz2.BZ2File(raw, mode="rb"))
    if kind == "xz":
        return cast(IO[bytes], lzma.LZMAFile(raw, mode="rb"))
    return raw


def _members(archive: tarfile.TarFile, reader: BoundedReader, declared: tuple[int, str],
             max_entries: int) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    limit_bytes, message = declared
    declared_bytes = 0
    count = 0
    try:
        while (member := archive.next()) is not None:
            count += 1
            if count > max_entries:
                raise ArchiveRefused(f"the archive has more than {max_entries} entries")
            declared_bytes += member.size  # tarfile skips the data of unknown types too
            if declared_bytes > limit_bytes:
                raise ArchiveRefused(message)
            # This member's data, and the next header, may now be inflated: no more.
            reader.budget_bytes = (declared_bytes + HEADER_SLACK_BYTES
                                   + MEMBER_SLACK_BYTES * count)
            yield archive, member
    except _INFLATE_ERRORS as exc:
        raise ArchiveRefused(f"the archive is corrupt: {exc}") from None


def is_tar(source: str | IO[bytes]) -> bool:
    """Return whether the file starts with a tar header (plain or compressed)."""
    try:
        with ExitStack() as stack:
            _open_stream(source, stack)
            return True
    except (ArchiveRefused, *_INFLATE_ERRORS):
        return False
