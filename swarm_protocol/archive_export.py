"""Checks of a torch.export (.pt2) archive's contents: what torch 2.13 would unpickle or run.

Read from `torch/export/pt2_archive/_package.py` and `torch/_export/serde/serialize.py`:
`torch.export.load` calls `torch.load(weights_only=False)` on a weight or tensor constant
whose config says `"use_pickle": true`, `torch._C._pickle_load_obj` on `custom_obj_*`
constants, `pickle.loads` on `opaque_obj_*` constants, `torch.load` on the legacy
`data/weights/<model>.pt` and `data/constants/<model>.pt` files, and loads native code
from `data/aotinductor/`. While building the graph it resolves each node target by
`getattr` from the `torch`, `_operator` or `math` module (so `torch.os.system` is
reachable) and parses symbolic shapes with `sympy.sympify`, which is `eval`. Each of
these is refused here, by allow lists; anything else unknown is refused too.
The sample inputs (`data/sample_inputs/model.pt`) are a pickle torch reads with its
restricted weights-only unpickler; the loader forces that mode (model_loading.py).
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from typing import Any

_WEIGHT_RE = re.compile(r"^weight_[0-9]+$")
_TENSOR_CONSTANT_RE = re.compile(r"^tensor_[0-9]+$")
_FIXED_FILES = {
    "archive_format", "archive_version", "byteorder", ".data/version",
    ".data/serialization_id", "models/model.json", "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json", "data/sample_inputs/model.pt",
}
_PAYLOAD_KEYS = {"path_name", "is_param", "use_pickle", "tensor_meta"}
_IDENT = r"[A-Za-z][A-Za-z0-9_]*"
# An aten op may start with one underscore (_to_copy); dunders only as aten's own names.
_TARGET_RES = (
    re.compile(rf"^torch\.ops\.{_IDENT}\.(_?{_IDENT}|__[a-z]+__)(\.{_IDENT})?$"),
    re.compile(r"^torch\.(sym_[a-z_]+|_sym_sqrt)$"),
    re.compile(r"^math\.[a-z][a-z0-9_]*$"),
)
_OPERATOR_NAMES = {
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
    "rshift", "matmul",
}
_DUNDER_OPS = {"and", "or", "xor", "lshift", "rshift", "iand", "ior", "ixor", "ilshift",
               "irshift"}
# sympify evaluates names in a namespace holding all of sympy and Python's builtins
# (eval, open, __import__): only symbols (s0, u3, zuf1) and arithmetic may appear.
_SYMBOL_RE = re.compile(r"^[a-z]+[0-9]+$")
_SYMPY_NAMES = {
    "Mod", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
    "True", "False", "oo", "zoo", "nan", "Integer", "Rational", "Float", "Pow", "Mul", "Add",
    "floor", "ceiling", "sqrt", "Piecewise", "FloorDiv", "ModularIndexing", "Where",
    "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift",
    "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "IsNonOverlappingAndDenseIndicator",
    "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
}
# torch writes a bare symbol as "Symbol('s31', positive=True, integer=True)".
_SYMPY_NAMES |= {"Symbol", "positive", "negative", "nonnegative", "nonpositive", "integer",
                 "real", "finite", "zero", "nonzero", "even", "odd"}
_EXPR_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)|(?P<name>[A-Za-z][A-Za-z0-9_]*)"
    r"|'(?P<quoted>[a-z]+[0-9]+)'|(?P<op>\*\*|//|<=|>=|==|!=|[-+*/%()<>,&|~=]))")


class ArchiveRefused(ValueError):
    """The archive is not acceptable; the message says why (shown to the uploader)."""


def _refused(message: str) -> ArchiveRefused:
    return ArchiveRefused(message)


def check_torch_export(archive: zipfile.ZipFile, root: str, tails: list[str],
                       max_json_bytes: int) -> None:
    """Refuse a .pt2 whose entries, configs or program ask for anything but plain tensors."""
    for tail in tails:
        check_export_entry(tail)
    missing = sorted(_FIXED_FILES - {".data/serialization_id"} - set(tails))
    if missing:
        raise _refused(f"the torch.export archive lacks {', '.join(missing)}")
    if _read(archive, root, "archive_format", 64).strip() != b"pt2":
        raise _refused("the torch.export archive's archive_format is not 'pt2'")
    for config, pattern, kind in (
        ("data/weights/model_weights_config.json", _WEIGHT_RE, "weight"),
        ("data/constants/model_constants_config.json", _TENSOR_CONSTANT_RE, "constant"),
    ):
        raw = _load_json(archive, root, config, max_json_bytes)
        present = {t.rsplit("/", 1)[1] for t in tails if t.startswith(config.rsplit("/", 1)[0])}
        check_payload_config(raw, pattern, kind, present)
    check_program(_load_json(archive, root, "models/model.json", max_json_bytes))


def check_export_entry(tail: str) -> None:
    """Refuse an entry name that torch would load as a pickle or native code, or not know."""
    if tail in _FIXED_FILES or tail.startswith("extra/"):  # extra files are read as text
        return
    folder, _, name = tail.rpartition("/")
    if folder == "data/weights" and _WEIGHT_RE.match(name):
        return
    if folder == "data/constants" and _TENSOR_CONSTANT_RE.match(name):
        return
    if tail.startswith("data/aotinductor/"):
        raise _refused(f"the archive holds compiled AOTInductor code ({tail!r}), which we "
                       "never load: it is native code")
    if name.startswith(("custom_obj_", "opaque_obj_")):
        raise _refused(f"the archive holds a pickled custom object ({tail!r})")
    if name.endswith((".pt", ".pkl", ".pickle", ".pth", ".bin")):
        raise _refused(f"the archive holds a pickle file ({tail!r}) that torch would unpickle")
    if folder == "models":
        raise _refused(f"the archive holds a program other than 'model' ({tail!r})")
    raise _refused(f"the torch.export archive holds an unexpected entry {tail!r}")


def check_payload_config(raw: Any, pattern: re.Pattern[str], kind: str,
                         present: set[str]) -> None:
    """Refuse a weights or constants config unless every entry is a plain tensor file."""
    if not isinstance(raw, dict) or set(raw) != {"config"} or not isinstance(raw["config"], dict):
        raise _refused(f"the {kind}s config has an unknown shape (expected {{\"config\": {{}}}})")
    for fqn, meta in raw["config"].items():
        if not isinstance(meta, dict) or not set(meta) <= _PAYLOAD_KEYS:
            raise _refused(f"the {kind} {fqn!r} has an unknown config shape")
        if meta.get("use_pickle") is not False:
            raise _refused(f"the {kind} {fqn!r} asks to be unpickled (use_pickle); "
                           "pickled weights, constants and objects are refused")
        path_name = meta.get("path_name")
        if not isinstance(path_name, str) or not pattern.match(path_name):
            raise _refused(f"the {kind} {fqn!r} points at {path_name!r}, not a plain tensor "
                           "file (custom and opaque objects are pickles, refused)")
        if path_name not in present:
            raise _refused(f"the {kind} {fqn!r} points at {path_name!r}, which is missing")
        if not isinstance(meta.get("tensor_meta"), dict) or not isinstance(
                meta.get("is_param"), bool):
            raise _refused(f"the {kind} {fqn!r} has no tensor description")


def check_program(program: Any) -> None:
    """Refuse graph targets outside torch.ops and symbolic shapes that are not arithmetic."""
    if not isinstance(program, dict) or "graph_module" not in program:
        raise _refused("models/model.json is not a torch.export program")
    for key, value in _walk(program):
        if key in ("target", "as_operator") and isinstance(value, str):
            check_target(value)
        elif key == "expr_str":
            check_sym_expr(value)


def check_target(target: str) -> None:
    """Refuse a graph target unless it is a registered operator or plain arithmetic."""
    module, _, name = target.partition(".")
    if module == "_operator" and name in _OPERATOR_NAMES:
        return
    match = any(regex.match(target) for regex in _TARGET_RES)
    dunder = re.search(r"\.__([a-z]+)__", target)
    if match and (dunder is None or dunder.group(1) in _DUNDER_OPS):
        return
    raise _refused(f"the program calls {target!r}, which is not a torch operator")


def check_sym_expr(expr: Any) -> None:
    """Refuse a symbolic-shape expression that is more than symbols, numbers and arithmetic."""
    if not isinstance(expr, str) or len(expr) > 10_000:
        raise _refused("the program holds a malformed symbolic shape expression")
    position = 0
    while position < len(expr.rstrip()):
        token = _EXPR_TOKEN_RE.match(expr, position)
        if token is None or token.end() == position:
            raise _refused(f"the symbolic shape {expr[:80]!r} is not plain arithmetic")
        name = token.group("name")
        if name and not (_SYMBOL_RE.match(name) or name in _SYMPY_NAMES):
            raise _refused(f"the symbolic shape {expr[:80]!r} uses {name!r}, which is refused")
        position = token.end()


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                yield key, inner
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


def _read(archive: zipfile.ZipFile, root: str, tail: str, max_bytes: int) -> bytes:
    info = archive.getinfo(f"{root}/{tail}")
    if info.file_size > max_bytes:
        raise _refused(f"{tail} is larger than {max_bytes} bytes")
    try:
        with archive.open(info) as handle:
            return handle.read(max_bytes + 1)[:max_bytes]
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError) as exc:
        raise _refused(f"the archive is corrupt reading {tail}: {exc}") from None


def _load_json(archive: zipfile.ZipFile, root: str, tail: str, max_bytes: int) -> Any:
    try:
        return json.loads(_read(archive, root, tail, max_bytes))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _refused(f"{tail} is not valid JSON: {exc}") from None
