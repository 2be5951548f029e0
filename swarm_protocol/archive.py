"""The one gate in front of every model loader: inspect an archive without loading it.

A model file is untrusted code. Before torch sees it, `inspect_archive` reads only the
zip's central directory and a few JSON files (never a pickle) and returns an
`InspectedArchive` once the archive passes; loaders (`swarm_protocol/model_loading.py`) take
that result, not a path, so no loader can skip the check. Deny by default: an entry,
a config field or a graph target this module does not know is refused. A file that is
not a zip goes to the ONNX inspector (`swarm_protocol/archive_onnx.py`).

No Django and no torch here: the portal's validation child and the replica import it.
"""

from __future__ import annotations

import re
import stat
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

from swarm_protocol import archive_export, archive_hf, archive_onnx
from swarm_protocol.archive_export import ArchiveRefused

FORMAT_TORCHSCRIPT = "torchscript"
FORMAT_TORCH_EXPORT = "torch_export"
FORMAT_ONNX = "onnx"
FORMAT_HF_CAUSAL_LM = archive_hf.FORMAT_HF_CAUSAL_LM  # a tar or zip of a Hugging Face folder
FORMATS = (FORMAT_TORCHSCRIPT, FORMAT_TORCH_EXPORT, FORMAT_ONNX, FORMAT_HF_CAUSAL_LM)

Source = str | IO[bytes]
_SEAL = object()  # only inspect_archive can make an InspectedArchive that loaders accept
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# TorchScript (torch.jit.save): pickles read by TorchScript's own C++ unpickler, which
# builds only tensors and TorchScript classes (no Python callables), plus code and data.
# torch.jit.trace adds the example inputs (traced_inputs), read back only on request.
_TORCHSCRIPT_FILES = {"data.pkl", "constants.pkl", "version", "byteorder", "traced_inputs.pkl"}
_TORCHSCRIPT_DIRS = ("code/", "data/", "constants/", "extra/", ".data/", "traced_inputs/")
__all__ = ["FORMATS", "ArchiveLimits", "ArchiveRefused", "InspectedArchive", "inspect_archive",
           "require_inspected"]


@dataclass(frozen=True)
class ArchiveLimits:
    """What a zip may declare before a byte of it is inflated."""

    max_uncompressed_bytes: int = 64 * 1024**3
    max_ratio: float = 200.0
    ratio_min_entry_bytes: int = 1024**2  # smaller entries may compress as they like
    max_entries: int = 100_000
    max_json_bytes: int = 256 * 1024**2  # configs and the program we parse ourselves
    max_onnx_bytes: int = archive_onnx.PROTOBUF_MAX_BYTES  # the whole .onnx file


@dataclass(frozen=True)
class InspectedArchive:
    """An archive that passed inspection: its source, format and top folder.

    For ONNX (no zip, no folder) `onnx` holds the parsed model and the very bytes that
    were checked, which the loader hands to ONNX Runtime (the file is not read again).
    """

    source: Source
    format: str
    root: str
    uncompressed_bytes: int
    _seal: object = field(default=None, repr=False, compare=False)
    onnx: archive_onnx.OnnxInspection | None = field(default=None, repr=False, compare=False)
    hf: archive_hf.HfInspection | None = field(default=None, repr=False, compare=False)


def inspect_archive(source: Source, limits: ArchiveLimits | None = None,
                    declared_format: str | None = None) -> InspectedArchive:
    """Return the archive's format once every check passes; raise ArchiveRefused otherwise."""
    limits = limits or ArchiveLimits()
    if declared_format == FORMAT_HF_CAUSAL_LM or (
            declared_format is None and archive_hf.looks_like_hf(source)):
        checked = archive_hf.inspect_hf(source, limits)
        _rewind(source)
        return InspectedArchive(source, FORMAT_HF_CAUSAL_LM, "", sum(checked.sizes.values()),
                                _SEAL, hf=checked)
    # A declared ONNX file is never read as a zip: its weights may hold a zip's signature.
    if declared_format == FORMAT_ONNX or not zipfile.is_zipfile(source):
        return _inspect_onnx(source, limits, declared_format)
    with _open_zip(source) as archive:
        infos = archive.infolist()
        total_bytes = check_entries(infos, limits)
        root = _single_root(infos)
        tails = [info.filename[len(root) + 1:] for info in infos]
        fmt = detect_format(tails)
        if declared_format and declared_format != fmt:
            raise ArchiveRefused(f"the file is a {fmt} archive, not {declared_format}")
        if fmt == FORMAT_TORCHSCRIPT:
            _check_torchscript(tails)
        else:
            archive_export.check_torch_export(archive, root, tails, limits.max_json_bytes)
    _rewind(source)
    return InspectedArchive(source, fmt, root, total_bytes, _SEAL)


def _inspect_onnx(source: Source, limits: ArchiveLimits,
                  declared_format: str | None) -> InspectedArchive:
    if declared_format not in (None, FORMAT_ONNX):
        raise ArchiveRefused(f"the file is not a TorchScript or torch.export archive "
                             f"(not a zip archive), as the format {declared_format} needs")
    try:
        checked = archive_onnx.inspect_onnx(
            source, min(limits.max_onnx_bytes, limits.max_uncompressed_bytes),
            limits.max_uncompressed_bytes)
    except ArchiveRefused as exc:
        if declared_format == FORMAT_ONNX or not str(exc).startswith("the file is not"):
            raise
        reason = str(exc).removeprefix("the file is not an ONNX model").lstrip(": ")
        raise ArchiveRefused("the file is not a TorchScript or torch.export archive (not a "
                             "zip archive), nor an ONNX model" + (f" ({reason})" if reason
                                                                  else "")) from None
    _rewind(source)
    return InspectedArchive(source, FORMAT_ONNX, "", len(checked.content), _SEAL, checked)


def require_inspected(archive: object) -> InspectedArchive:
    """Return `archive` if inspect_archive made it; loaders call this first."""
    if not isinstance(archive, InspectedArchive) or archive._seal is not _SEAL:
        raise TypeError("loaders take the result of swarm_protocol.archive.inspect_archive")
    return archive


def _open_zip(source: Source) -> zipfile.ZipFile:
    _rewind(source)
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveRefused(f"the archive is corrupt: {exc}") from None


def _rewind(source: Source) -> None:
    if not isinstance(source, str):
        source.seek(0)


def check_entries(infos: Iterable[zipfile.ZipInfo], limits: ArchiveLimits) -> int:
    """Check names, kinds and declared sizes of every entry; return the total size."""
    seen: set[str] = set()
    total_bytes = 0
    for count, info in enumerate(infos, start=1):
        if count > limits.max_entries:
            raise ArchiveRefused(f"the archive has more than {limits.max_entries} entries")
        check_entry_name(info.filename)
        if info.filename in seen:
            raise ArchiveRefused(f"the archive holds {info.filename!r} twice")
        seen.add(info.filename)
        _check_entry_kind(info)
        _check_ratio(info, limits)
        total_bytes += info.file_size
        if total_bytes > limits.max_uncompressed_bytes:
            raise ArchiveRefused(
                f"the archive inflates to more than {limits.max_uncompressed_bytes} bytes "
                "(ARCHIVE_MAX_UNCOMPRESSED_BYTES)")
    return total_bytes


def check_entry_name(name: str) -> None:
    """Refuse names that could point outside a folder, or that torch never writes."""
    if not name or name.startswith("/") or _DRIVE_RE.match(name):
        raise ArchiveRefused(f"the archive entry {name!r} has an absolute path")
    if "\\" in name or "\0" in name:
        raise ArchiveRefused(f"the archive entry {name!r} has a backslash or NUL in its name")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ArchiveRefused(f"the archive entry {name!r} has an empty, '.' or '..' path part")


def _check_entry_kind(info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ArchiveRefused(f"the archive entry {info.filename!r} is a symbolic link")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # tools may write permission bits only
        raise ArchiveRefused(f"the archive entry {info.filename!r} is not a regular file")
    if info.flag_bits & 0x1:
        raise ArchiveRefused(f"the archive entry {info.filename!r} is encrypted")


def _check_ratio(info: zipfile.ZipInfo, limits: ArchiveLimits) -> None:
    if info.file_size <= limits.ratio_min_entry_bytes:
        return
    ratio = info.file_size / max(info.compress_size, 1)
    if ratio > limits.max_ratio:
        raise ArchiveRefused(
            f"the archive entry {info.filename!r} inflates {ratio:.0f} times "
            f"({info.compress_size} to {info.file_size} bytes; the limit is "
            f"{limits.max_ratio:g}, ARCHIVE_MAX_RATIO)")


def _single_root(infos: list[zipfile.ZipInfo]) -> str:
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if not infos or any("/" not in info.filename for info in infos) or len(roots) != 1:
        raise ArchiveRefused("the archive holds neither a TorchScript module nor a "
                             "torch.export program (torch writes one top folder)")
    return roots.pop()


def detect_format(tails: Iterable[str]) -> str:
    """Return the format from entry names relative to the top folder."""
    names = set(tails)
    if "archive_format" in names or "models/model.json" in names:
        return FORMAT_TORCH_EXPORT
    if "data.pkl" in names or any(t.startswith("code/") for t in names):
        return FORMAT_TORCHSCRIPT
    raise ArchiveRefused(
        "the archive holds neither a TorchScript module nor a torch.export program")


def _check_torchscript(tails: list[str]) -> None:
    if "data.pkl" not in tails:
        raise ArchiveRefused("the TorchScript archive has no data.pkl")
    for tail in tails:
        if tail not in _TORCHSCRIPT_FILES and not tail.startswith(_TORCHSCRIPT_DIRS):
            raise ArchiveRefused(f"the TorchScript archive holds an unexpected entry {tail!r}")
