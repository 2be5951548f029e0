"""The Hugging Face part of the archive inspector: a causal LM folder packed as tar or zip.

What makes such a folder dangerous is what `transformers` would run or unpickle: weights in
`pytorch_model.bin` (a pickle), `*.py` files a config names through `auto_map` (remote code),
and anything else a loader might pick up next to the files we expect. So deny by default:
every member must be a regular file whose name is on an allow list (config, tokenizer,
generation config, chat template, safetensors weights), in one folder at most; pickle and
code files are refused by name with a clear message; configs that ask for remote code are
refused; every safetensors header is parsed (no tensor is read) and its offsets, dtypes and
shapes checked, which also gives the parameter count and dtype. Sizes are checked from the
headers before a byte of the data is read (tar) or inflated (zip, with its ratio limit).

No Django and no torch: the validation child and the replica import it.
"""

from __future__ import annotations

import json
import re
import struct
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from swarm_protocol import archive_hf_tar
from swarm_protocol.archive_export import ArchiveRefused

if TYPE_CHECKING:
    from swarm_protocol.archive import ArchiveLimits

FORMAT_HF_CAUSAL_LM = "hf_causal_lm"
JSON_FILES = frozenset({"config.json", "generation_config.json", "tokenizer_config.json",
                        "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                        "model.safetensors.index.json", "vocab.json"})
OTHER_FILES = frozenset({"tokenizer.json", "chat_template.jinja", "merges.txt", "README.md",
                         "LICENSE", "LICENSE.txt", ".gitattributes", "model.safetensors"})
_SHARD_RE = re.compile(r"^model-[0-9]{5}-of-[0-9]{5}\.safetensors$")
# Weights and code that transformers would unpickle or import: named, so the refusal says why.
_REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy",
                     ".npz", ".h5", ".msgpack", ".py", ".pyc", ".so", ".gguf", ".onnx")
_REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2,
                           "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                           "I64": 8, "U64": 8, "F64": 8}
SAFETENSORS_HEADER_MAX_BYTES = 100 * 1024**2  # the safetensors library's own limit
JSON_MAX_BYTES = 64 * 1024**2  # tokenizer.json of a large vocabulary is tens of MB
# What an hf_causal_lm version serves on OIP infer, as Triton's LLM models name it.
TEXT_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]}],
    "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1, 1]}],
}


@dataclass(frozen=True)
class HfInspection:
    """A checked causal-LM folder: its members and what the files say of the model."""

    container: str  # "tar" or "zip"
    members: dict[str, str]  # file name (no folder) -> member name in the archive
    sizes: dict[str, int]  # file name -> bytes
    config: dict[str, Any] = field(repr=False)
    parameter_count: int = 0
    dtype: str = ""  # the weights' most common safetensors dtype, e.g. F32 or BF16
    generation_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def context_tokens(self) -> int:
        """Return the context length the config states (0 when it states none)."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length",
                    "seq_length"):
            value = self.config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return 0

    @property
    def vocab_size(self) -> int:
        """Return the vocabulary size the config states (0 when it states none)."""
        value = self.config.get("vocab_size")
        return value if isinstance(value, int) and value > 0 else 0

    def metadata(self) -> dict[str, Any]:
        """Return what the registry records: context length, vocabulary, parameters, dtype."""
        return {"model_type": self.config.get("model_type", ""),
                "context_tokens": self.context_tokens, "vocab_size": self.vocab_size,
                "parameter_count": self.parameter_count, "dtype": self.dtype,
                "chat_template": any(name.startswith("chat_template") for name in self.members)}


def looks_like_hf(source: str | IO[bytes]) -> bool:
    """Return whether the file is a tar, or a zip holding a config.json (not a torch zip)."""
    try:
        if zipfile.is_zipfile(source):
            _rewind(source)
            with zipfile.ZipFile(source) as archive:
                return any(_tail(name) == "config.json" for name in archive.namelist())
        _rewind(source)
        return archive_hf_tar.is_tar(source)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    finally:
        _rewind(source)


def inspect_hf(source: str | IO[bytes], limits: ArchiveLimits) -> HfInspection:
    """Return the checked folder; raise ArchiveRefused naming what is refused."""
    _rewind(source)
    if zipfile.is_zipfile(source):
        _rewind(source)
        with _open_zip(source) as archive:
            return _inspect_zip(archive, limits)
    with archive_hf_tar.forward_tar(source, limits) as tar_members:
        return _inspect_tar(tar_members)


def _inspect_zip(archive: zipfile.ZipFile, limits: ArchiveLimits) -> HfInspection:
    from swarm_protocol.archive import check_entries

    infos = [info for info in archive.infolist() if not info.is_dir()]
    check_entries(infos, limits)
    members = _members([info.filename for info in infos])
    sizes = {name: archive.getinfo(full).file_size for name, full in members.items()}
    return _inspect_files(members, sizes, lambda full, n: _read_zip(archive, full, n), "zip")


def _inspect_tar(tar_members: Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]
                 ) -> HfInspection:
    """Check every member in one forward pass, reading the heads that are parsed later.

    Only a file whose name passes check_member_name is read, each name once (a second
    folder is refused after the loop), so at most a few configs and headers are held.
    """
    from swarm_protocol.archive import check_entry_name

    sizes: dict[str, int] = {}
    heads: dict[str, bytes] = {}
    for archive, member in tar_members:
        name = tar_name(member.name)
        if member.isdir() and name in ("", "."):
            continue  # the "./" entry of `tar -C folder .`
        check_entry_name(name.rstrip("/") if member.isdir() else name)
        if member.isdir():
            continue
        if not member.isfile():
            raise ArchiveRefused(f"the archive entry {member.name!r} is a link or a special "
                                 "file, not a regular file")
        if name in sizes:
            raise ArchiveRefused(f"the archive holds {member.name!r} twice")
        sizes[name] = member.size
        tail = _tail(name)
        check_member_name(tail)
        if not any(_tail(seen) == tail for seen in heads):
            heads[name] = _read_head(archive, member, tail)
    members = _members(list(sizes))
    return _inspect_files(members, {name: sizes[full] for name, full in members.items()},
                          lambda full, n: heads[full][:n], "tar")


def _read_head(archive: tarfile.TarFile, member: tarfile.TarInfo, tail: str) -> bytes:
    """Return what _inspect_files parses of a member: a JSON file, a safetensors header."""
    if tail in JSON_FILES:
        return _read_tar(archive, member, lambda handle: handle.read(
            min(member.size, JSON_MAX_BYTES)))
    if not is_weights_file(tail):
        return b""
    return _read_tar(archive, member, _safetensors_head)


def _safetensors_head(handle: IO[bytes]) -> bytes:
    # The 8-byte length and no more than the header: the weights are never read here.
    head = handle.read(8)
    if len(head) < 8:
        return head
    (header_bytes,) = struct.unpack("<Q", head)
    return head + handle.read(min(header_bytes, SAFETENSORS_HEADER_MAX_BYTES))


def tar_name(name: str) -> str:
    """Return a tar member's name without the leading "./" that `tar -C dir .` writes."""
    while name.startswith("./"):
        name = name[2:]
    return name


def _members(names: list[str]) -> dict[str, str]:
    """Return file name -> member name; refuse folders deeper than one, unknown files."""
    roots = {name.split("/", 1)[0] for name in names if "/" in name}
    if any(name.count("/") > 1 for name in names) or len(roots) > 1 or (
            roots and any("/" not in name for name in names)):
        raise ArchiveRefused("the archive must hold the model's files at its top, or in one "
                             "top folder (no subfolders)")
    members: dict[str, str] = {}
    for full in names:
        name = _tail(full)
        check_member_name(name)
        members[name] = full
    for required in ("config.json", "tokenizer.json"):
        if required not in members:
            raise ArchiveRefused(f"the Hugging Face folder has no {required}")
    if not any(is_weights_file(name) for name in members):
        raise ArchiveRefused("the Hugging Face folder has no model.safetensors weights")
    return members


def check_member_name(name: str) -> None:
    """Refuse pickles and code by suffix, and any file not on the allow list."""
    if name.lower().endswith(_REFUSED_SUFFIXES):
        raise ArchiveRefused(
            f"the archive holds {name!r}: pickled weights and code are refused; save the "
            "weights as safetensors (save_pretrained(safe_serialization=True))")
    if name not in JSON_FILES and name not in OTHER_FILES and not _SHARD_RE.match(name):
        raise ArchiveRefused(f"the archive holds an unexpected file {name!r} (a causal LM "
                             "folder holds config, tokenizer and safetensors files only)")


def is_weights_file(name: str) -> bool:
    """Return whether `name` is a safetensors weights file (whole or one shard)."""
    return name == "model.safetensors" or bool(_SHARD_RE.match(name))


Reader = Any  # (member name, max bytes) -> bytes


def _inspect_files(members: dict[str, str], sizes: dict[str, int], read: Reader,
                   container: str) -> HfInspection:
    configs = {name: _json(name, read(members[name], JSON_MAX_BYTES), sizes[name])
               for name in members if name in JSON_FILES}
    for name, value in configs.items():
        _check_no_remote_code(name, value)
    config = configs["config.json"]
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ArchiveRefused("config.json is not a model config (no model_type)")
    architectures = config.get("architectures") or []
    if not all(isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures):
        raise ArchiveRefused(f"config.json names {architectures}, not a causal language "
                             "model (…ForCausalLM)")
    counts: Counter[str] = Counter()
    parameters = 0
    for name in sorted(filter(is_weights_file, members)):
        header = read_safetensors_header(read(members[name], SAFETENSORS_HEADER_MAX_BYTES + 8),
                                         sizes[name], name)
        parameters += count_parameters(header, sizes[name], name, counts)
    _check_index(configs.get("model.safetensors.index.json"), members)
    generation = configs.get("generation_config.json")
    return HfInspection(container, members, sizes, config, parameters,
                        counts.most_common(1)[0][0] if counts else "",
                        generation if isinstance(generation, dict) else {})


def _json(name: str, content: bytes, size: int) -> Any:
    if size > JSON_MAX_BYTES:
        raise ArchiveRefused(f"{name} is larger than {JSON_MAX_BYTES} bytes")
    try:
        return json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveRefused(f"{name} is not valid JSON: {exc}") from None


def _check_no_remote_code(name: str, value: Any) -> None:
    if isinstance(value, dict):
        for key in _REMOTE_CODE_KEYS:
            if key in value:
                raise ArchiveRefused(f"{name} has {key!r}: models that need their own Python "
                                     "code (trust_remote_code) are refused")


def read_safetensors_header(head: bytes, size: int, name: str) -> dict[str, Any]:
    """Return the parsed JSON header of a safetensors file from its first bytes."""
    if len(head) < 8:
        raise ArchiveRefused(f"{name} is not a safetensors file (too short)")
    (header_bytes,) = struct.unpack("<Q", head[:8])
    if header_bytes > SAFETENSORS_HEADER_MAX_BYTES or 8 + header_bytes > size:
        raise ArchiveRefused(f"{name} is not a safetensors file (header of {header_bytes} "
                             "bytes)")
    header = _json(name, head[8:8 + header_bytes], header_bytes)
    if not isinstance(header, dict):
        raise ArchiveRefused(f"{name} is not a safetensors file (header is not an object)")
    return header


def count_parameters(header: dict[str, Any], size: int, name: str,
                     dtypes: Counter[str]) -> int:
    """Return the header's element count; refuse bad dtypes, shapes or offsets."""
    parameters = 0
    for tensor, spec in header.items():
        if tensor == "__metadata__":
            continue
        dtype, shape, offsets = _tensor_spec(spec, name, tensor)
        count = 1
        for dim in shape:
            count *= dim
        begin, end = offsets
        if end - begin != count * SAFETENSORS_DTYPE_BYTES[dtype] or end > size:
            raise ArchiveRefused(f"{name}: tensor {tensor!r} has offsets {offsets} that do "
                                 f"not match its {dtype} shape {shape}")
        parameters += count
        dtypes[dtype] += count
    return parameters


def _tensor_spec(spec: Any, name: str, tensor: str) -> tuple[str, list[int], list[int]]:
    try:
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        ok = (dtype in SAFETENSORS_DTYPE_BYTES and isinstance(shape, list)
              and all(isinstance(d, int) and d >= 0 for d in shape)
              and isinstance(offsets, list) and len(offsets) == 2
              and all(isinstance(o, int) and o >= 0 for o in offsets)
              and offsets[0] <= offsets[1])
    except (TypeError, KeyError):
        ok = False
    if not ok:
        raise ArchiveRefused(f"{name}: tensor {tensor!r} has a malformed header entry")
    return dtype, shape, offsets


def _check_index(index: Any, members: dict[str, str]) -> None:
    if index is None:
        return
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ArchiveRefused("model.safetensors.index.json has no weight_map")
    for shard in set(weight_map.values()):
        if not isinstance(shard, str) or not is_weights_file(shard) or shard not in members:
            raise ArchiveRefused(f"model.safetensors.index.json names {shard!r}, which is "
                                 "not a safetensors file of the archive")


def _tail(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _rewind(source: str | IO[bytes]) -> None:
    if not isinstance(source, str):
        source.seek(0)


def _open_zip(source: str | IO[bytes]) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveRefused(f"the archive is corrupt: {exc}") from None


def _read_zip(archive: zipfile.ZipFile, name: str, max_bytes: int) -> bytes:
    with archive.open(name) as handle:
        return handle.read(max_bytes)


def _read_tar(archive: tarfile.TarFile, member: tarfile.TarInfo,
              read: Callable[[IO[bytes]], bytes]) -> bytes:
    # One handle per member: the stream only goes forward, so it is never opened twice.
    handle = archive.extractfile(member)
    if handle is None:
        raise ArchiveRefused(f"the archive entry {member.name!r} is not a regular file")
    try:
        return read(handle)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveRefused(f"the archive is corrupt: {exc}") from None


def iter_member_bytes(source: str | IO[bytes], inspection: HfInspection,
                      chunk_bytes: int = 1024**2) -> Iterator[tuple[str, Iterator[bytes]]]:
    """Yield (file name, its chunks) for each checked member, reading no other entry."""
    _rewind(source)
    if inspection.container == "zip":
        with _open_zip(source) as zip_file:
            for name, full in inspection.members.items():
                with zip_file.open(full) as handle:
                    yield name, _chunks(handle, chunk_bytes)
        return
    from swarm_protocol.archive import ArchiveLimits

    # The sizes were checked when it was inspected: now nothing may declare more.
    limits = ArchiveLimits(max_uncompressed_bytes=sum(inspection.sizes.values()),
                           max_ratio=float("inf"))
    with archive_hf_tar.forward_tar(source, limits) as tar_members:
        by_name = {full: name for name, full in inspection.members.items()}
        for tar, member in tar_members:
            name = tar_name(member.name)
            if name in by_name and member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                yield by_name[name], _chunks(extracted, chunk_bytes)


def _chunks(handle: IO[bytes], chunk_bytes: int) -> Iterator[bytes]:
    while chunk := handle.read(chunk_bytes):
        yield chunk
