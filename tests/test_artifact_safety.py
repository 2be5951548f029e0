"""A model file is untrusted code: nothing of ours unpickles it, inflates it blindly, or
loads it with the portal's secrets, user or network."""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from registry import services
from registry.validation import (
    ArtifactRejected,
    child_environment,
    popen_arguments,
    probe_sandbox,
    sandbox_home,
    sandbox_plan,
    validate_artifact,
)
from serving.replica.runner import LoadError, ModelRunner
from swarm_protocol.archive import (
    ArchiveLimits,
    ArchiveRefused,
    InspectedArchive,
    inspect_archive,
)
from swarm_protocol.model_loading import load_module
from swarm_protocol.signature import parse_signature
from tests import factories
from tests.factories import SIGNATURE
from tests.test_registry_refusals import assert_refused, upload_bytes

SECRETS = {"SECRET_KEY": "s" * 40, "DATABASE_URL": "postgres://u:pw@db/x",
           "REDIS_URL": "redis://127.0.0.1:6379/0", "SWARM_ADMIN_PASSWORD": "hunter2"}
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def marker(tmp_path_factory) -> Path:
    """A path a hostile pickle would create; its folder is writable by anyone, even the
    sandbox's user, so only our refusal to unpickle keeps it absent."""
    folder = tmp_path_factory.mktemp("marker")
    folder.chmod(0o1777)
    for parent in folder.parents:  # pytest's base folder is 0700: let `nobody` through
        if parent == Path("/tmp") or parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
    return folder / "pwned"


@pytest.fixture
def pt2(model_files, tmp_path) -> Path:
    return model_files["torch_export"]


def export_config(path: Path, name: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        return json.loads(archive.read(f"{root}/{name}"))


# --- 1. pickles -------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_pt2_with_a_pickled_weight_is_refused_at_upload(operator_api, model, store, pt2,
                                                         marker, tmp_path):
    hostile = factories.with_pickled_weight(pt2, tmp_path / "hostile.pt2", marker)
    response = upload_bytes(operator_api, model.name, hostile.read_bytes())
    assert_refused(response, 400, "asks to be unpickled (use_pickle)", store)
    assert not marker.exists()


def test_the_replica_refuses_a_pickled_weight_before_loading(pt2, marker, tmp_path):
    hostile = factories.with_pickled_weight(pt2, tmp_path / "hostile.pt2", marker)
    runner = ModelRunner(str(hostile), "torch_export", "cpu", parse_signature(SIGNATURE), 1)
    with pytest.raises(LoadError, match="use_pickle"):
        runner.load(warm_up_rows=1)
    assert not marker.exists()


def test_hostile_sample_inputs_are_never_unpickled_freely(pt2, marker, tmp_path):
    # torch.export retries a failed weights-only load of its sample inputs without the
    # restriction; the loader forces weights-only, so the payload fails instead of running.
    hostile = factories.rewrite_archive(pt2, tmp_path / "inputs.pt2", replace={
        "data/sample_inputs/model.pt": factories.hostile_pickle(marker)})
    with pytest.raises(ArtifactRejected, match="could not be loaded"):
        validate_artifact(hostile, SIGNATURE, None, timeout_s=120, memory_bytes=4 * 1024**3)
    assert not marker.exists()


def _with_config(pt2: Path, name: str, change) -> dict[str, bytes]:
    config = export_config(pt2, name)
    change(config)
    return {name: json.dumps(config).encode()}


WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
TENSOR_META = {"dtype": 7, "sizes": [], "requires_grad": False,
               "device": {"type": "cpu", "index": None}, "strides": [],
               "storage_offset": {"as_int": 0}, "layout": 7}


def _constant(path_name: str, use_pickle: bool, meta: dict | None = TENSOR_META):
    def change(config: dict) -> None:
        config["config"]["c0"] = {"path_name": path_name, "is_param": False,
                                  "use_pickle": use_pickle, "tensor_meta": meta}
    return change


def _first_weight(**changes):
    def change(config: dict) -> None:
        next(iter(config["config"].values())).update(changes)
    return change


def _retarget(target: str, replacement: str):
    def change(program: dict) -> None:
        text = json.dumps(program).replace(f'"{target}"', json.dumps(replacement), 1)
        program.clear()
        program.update(json.loads(text))
    return change


HOSTILE_EXPORTS = {
    "pickled-constant": (lambda p: {**_with_config(p, CONSTANTS, _constant("tensor_0", True)),
                                    "data/constants/tensor_0": b"x"}, {}, "use_pickle"),
    "custom-object": (lambda p: _with_config(p, CONSTANTS, _constant("custom_obj_0", False)),
                      {"data/constants/custom_obj_0": b"x"}, "pickled custom object"),
    "opaque-object": (lambda p: _with_config(p, CONSTANTS, _constant("opaque_obj_0", False)),
                      {"data/constants/opaque_obj_0": b"x"}, "pickled custom object"),
    "unknown-weight-field": (lambda p: _with_config(p, WEIGHTS, _first_weight(loader="x")),
                             {}, "unknown config shape"),
    "weight-without-use-pickle": (
        lambda p: _with_config(p, WEIGHTS, lambda c: next(iter(c["config"].values())).pop(
            "use_pickle")), {}, "use_pickle"),
    "unknown-config-shape": (lambda p: {WEIGHTS: b"[]"}, {}, "unknown shape"),
    "legacy-pickled-weights": (lambda p: {}, {"data/weights/model.pt": b"x"}, "pickle file"),
    "aot-inductor": (lambda p: {}, {"data/aotinductor/model/model.so": b"x"}, "native code"),
    "pickle-file": (lambda p: {}, {"data/extra.pkl": b"x"}, "pickle file"),
    "second-program": (lambda p: {}, {"models/other.json": b"{}"}, "program other than"),
    "unknown-entry": (lambda p: {}, {"data/notes.txt": b"x"}, "unexpected entry"),
    "os-system-target": (
        lambda p: _with_config(p, "models/model.json",
                               _retarget("torch.ops.aten.relu.default", "torch.os.system")),
        {}, "not a torch operator"),
    "eval-in-a-shape": (
        lambda p: _with_config(p, "models/model.json", _retarget(
            "Symbol('s31', positive=True, integer=True)", "__import__('os').getpid()")),
        {}, "not plain arithmetic"),
    "not-pt2": (lambda p: {"archive_format": b"pt3"}, {}, "archive_format"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_EXPORTS))
def test_the_inspector_refuses_every_way_a_pt2_asks_for_pickle_or_code(pt2, tmp_path, case):
    replace, add, fragment = HOSTILE_EXPORTS[case]
    hostile = factories.rewrite_archive(pt2, tmp_path / "h.pt2", replace=replace(pt2), add=add)
    with pytest.raises(ArchiveRefused, match=fragment):
        inspect_archive(str(hostile))


def test_the_legacy_layout_torch_falls_back_to_is_refused(pt2, tmp_path):
    # When load_pt2 fails, torch.export.load reads a top-level `version` and unpickles
    # serialized_state_dict.json with torch.load: such an archive never gets that far.
    with zipfile.ZipFile(pt2) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    legacy = _zip(tmp_path / "legacy.pt2", [*entries, ("version", b"8.0"),
                                            ("serialized_state_dict.json", b"x")])
    with pytest.raises(ArchiveRefused, match="one top folder"):
        inspect_archive(str(legacy))


def test_plain_archives_pass_the_inspector(model_files, tmp_path):
    import torch

    from registry.demo import build_mlp

    assert inspect_archive(str(model_files["torch_export"])).format == "torch_export"
    assert inspect_archive(str(model_files["torchscript"])).format == "torchscript"
    traced = tmp_path / "traced.pt"  # torch.jit.trace also writes its example inputs
    torch.jit.save(torch.jit.trace(build_mlp(), torch.zeros(2, 4)), str(traced))
    assert inspect_archive(str(traced)).format == "torchscript"


def test_the_loader_takes_only_what_the_inspector_returned(model_files):
    forged = InspectedArchive(str(model_files["torch_export"]), "torch_export", "m", 1)
    with pytest.raises(TypeError, match="inspect_archive"):
        load_module(forged)


LOADERS = {"torch.jit.load", "torch.export.load", "torch.load", "pickle.load", "pickle.loads",
           "torch._C._pickle_load_obj", "torch.jit._load_for_lite_interpreter", "load_pt2",
           "torch.package.PackageImporter", "torch.serialization.load",
           # ONNX: a session runs the model; onnx.load follows external data paths.
           "onnxruntime.InferenceSession", "ort.InferenceSession", "InferenceSession",
           "onnx.load", "onnx.load_model", "onnx.load_external_data_for_model",
           "load_external_data_for_model"}


def _called_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            names.add(ast.unparse(node.func))
    return names


def test_only_the_model_loader_calls_a_torch_loader():
    # Every format, now and later, must load through swarm_protocol/model_loading.py, whose
    # load_module and load_onnx_session take only what inspect_archive returned.
    root = Path(__file__).resolve().parent.parent
    callers = sorted(
        str(path.relative_to(root))
        for folder in ("swarm_protocol", "registry", "serving", "scaling", "swarm_portal",
                       "dashboards", "bench")
        for path in (root / folder).rglob("*.py")
        if _called_names(path.read_text()) & LOADERS
    )
    assert callers == ["swarm_protocol/model_loading.py"]


def test_the_inspector_imports_neither_django_nor_torch():
    # The replica imports it too, and the child runs it before importing torch.
    code = ("import sys, swarm_protocol.archive, swarm_protocol.model_loading,"
            " registry.inspect_child;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'torch')))")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            text=True, timeout=60, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- 2. the validation child's sandbox ----------------------------------------------------

def test_the_child_environment_carries_no_secret(tmp_path):
    env = child_environment(str(tmp_path), base={**SECRETS, "PATH": "/usr/bin", "LANG": "C"})
    assert not set(SECRETS) & set(env)
    assert env["HOME"] == env["TMPDIR"] == str(tmp_path)
    assert env["PATH"] == "/usr/bin" and env["OMP_NUM_THREADS"] == "1"
    assert env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"


def test_the_sandbox_drops_root_and_the_network_but_asks_nothing_of_other_users():
    usable = lambda plan: None  # noqa: E731 (the sandbox user can read this installation)
    as_root = sandbox_plan(0, which=lambda name: f"/usr/bin/{name}", probe=usable)
    assert as_root.uid == 65534 and as_root.isolated_network
    assert as_root.prefix[:2] == ["/usr/bin/unshare", "--net"]
    assert "--clear-groups" in as_root.prefix and "--reuid=65534" in as_root.prefix
    fallback = sandbox_plan(0, which=lambda name: None, probe=usable)
    assert fallback.popen_user and fallback.uid == 65534 and not fallback.isolated_network
    kwargs = popen_arguments(["-c", "pass"], fallback, "/tmp", 1024**3)
    assert (kwargs["user"], kwargs["group"], kwargs["extra_groups"]) == (65534, 65534, [])
    assert kwargs["start_new_session"]
    assert sandbox_plan(1000).prefix == [] and sandbox_plan(1000).uid is None
    unknown = sandbox_plan(0, which=lambda name: None, user="no-such-user-here", probe=usable)
    assert (unknown.uid, unknown.gid) == (65534, 65534)


def test_a_sandbox_user_who_cannot_read_the_installation_keeps_the_other_walls():
    """A virtualenv under /root: dropping to nobody would refuse every upload."""
    plan = sandbox_plan(0, which=lambda name: f"/usr/bin/{name}",
                        probe=lambda plan: "torch is not importable")
    assert plan.uid is None and plan.prefix == ["/usr/bin/unshare", "--net", "--"]
    assert plan.isolated_network and "torch is not importable" in plan.kept_user_because
    assert "not under /root" in plan.kept_user_because


@pytest.mark.skipif(not IS_ROOT, reason="dropping to another user needs root")
def test_the_probe_finds_this_installation_usable_by_nobody():
    """This checkout and its virtualenv are readable by others: the real drop is kept."""
    plan = sandbox_plan(0)
    assert probe_sandbox(plan) is None or "not importable" in probe_sandbox(plan)
    assert (plan.uid == 65534) == (probe_sandbox(plan) is None)


PROBE = """
import json, os, socket, sys
try:
    socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    network = "open"
except OSError as exc:
    network = type(exc).__name__
print(json.dumps({"uid": os.getuid(), "groups": os.getgroups(),
                  "netns": os.readlink("/proc/self/ns/net"), "env": sorted(os.environ),
                  "artifact": os.read(int(sys.argv[1]), 4).hex(), "network": network}))
"""


@pytest.mark.skipif(not IS_ROOT, reason="the user and network drop need root (CI runs as root)")
def test_a_real_child_runs_as_nobody_without_network_or_secrets(monkeypatch, model_files):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    plan = sandbox_plan(os.geteuid())
    path = model_files["torchscript"]
    with open(path, "rb") as artifact, sandbox_home(plan) as home:
        kwargs = popen_arguments(["-c", PROBE, str(artifact.fileno())], plan, home, 1024**3,
                                 (artifact.fileno(),))
        proc = subprocess.Popen(**kwargs)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    seen = json.loads(stdout)
    if plan.kept_user_because is None:
        assert seen["uid"] == 65534 and seen["groups"] in ([], [65534])
    else:  # an installation nobody cannot read (CI's clone under /root): the other walls
        assert plan.isolated_network and "cannot use this installation" in plan.kept_user_because
    assert not set(SECRETS) & set(seen["env"])
    assert seen["artifact"] == "504b0304"  # it reads the file through the descriptor
    if plan.isolated_network:
        assert seen["netns"] != os.readlink("/proc/self/ns/net")
        assert seen["network"] != "open"


# --- 3. archives: sizes, names, concurrency ------------------------------------------------

def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for info, content in entries:
            archive.writestr(info, content)
    return path


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(("name", "fragment"), [
    ("/m/data.pkl", "absolute path"), ("C:/m/data.pkl", "absolute path"),
    ("m/../data.pkl", "'..'"), ("m\\data.pkl", "backslash"), ("m//data.pkl", "empty"),
])
def test_entries_that_could_escape_a_folder_are_refused(tmp_path, name, fragment):
    path = _zip(tmp_path / "x.pt", [("m/data.pkl", b"x"), (name, b"x")])
    with pytest.raises(ArchiveRefused, match=fragment):
        inspect_archive(str(path))


def test_symlinks_and_duplicates_are_refused(tmp_path):
    link = _zip(tmp_path / "l.pt", [("m/data.pkl", b"x"), (_symlink("m/code/x"), b"/etc")])
    with pytest.raises(ArchiveRefused, match="symbolic link"):
        inspect_archive(str(link))
    with pytest.warns(UserWarning, match="Duplicate"):
        twice = _zip(tmp_path / "d.pt", [("m/data.pkl", b"x"), ("m/data.pkl", b"y")])
    with pytest.raises(ArchiveRefused, match="twice"):
        inspect_archive(str(twice))


def zip_bomb(path: Path, inflated_bytes: int) -> Path:
    """A TorchScript-looking zip whose data.pkl is `inflated_bytes` of zeros, deflated."""
    chunk = b"\0" * (4 * 1024**2)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m/version", b"3")
        with archive.open("m/data.pkl", "w", force_zip64=True) as handle:
            for _ in range(inflated_bytes // len(chunk)):
                handle.write(chunk)
    return path


@pytest.mark.django_db(transaction=True)
def test_a_zip_bomb_is_refused_from_its_directory(operator_api, model, store, tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.pt", 512 * 1024**2)
    assert bomb.stat().st_size < 1024**2
    response = upload_bytes(operator_api, model.name, bomb.read_bytes())
    assert_refused(response, 400, "inflates", store)
    assert "ARCHIVE_MAX_RATIO" in response.json()["error"]


@pytest.mark.django_db(transaction=True)
def test_an_archive_over_the_uncompressed_limit_is_refused(operator_api, model, store,
                                                           model_files, settings):
    settings.ARCHIVE_MAX_UNCOMPRESSED_BYTES = 2048
    response = upload_bytes(operator_api, model.name, model_files["torchscript"].read_bytes())
    assert_refused(response, 400, "ARCHIVE_MAX_UNCOMPRESSED_BYTES", store)


def test_a_ratio_limit_spares_small_entries(tmp_path):
    small = _zip(tmp_path / "s.pt", [("m/data.pkl", b"\0" * 1024**2)])  # exactly 1 MiB
    assert inspect_archive(str(small), ArchiveLimits(max_ratio=2)).format == "torchscript"


@pytest.mark.django_db(transaction=True)
def test_validations_beyond_the_limit_answer_503_with_retry_after(
        operator_api, model, store, model_files, settings):
    settings.VALIDATION_CONCURRENCY = 1
    settings.VALIDATION_QUEUE_WAIT_S = 0.2
    slots = services.validation_slots(1)
    assert slots.acquire(timeout=5)  # another upload is being validated
    try:
        response = upload_bytes(operator_api, model.name,
                                model_files["torchscript"].read_bytes())
    finally:
        slots.release()
    assert_refused(response, 503, "VALIDATION_CONCURRENCY", store)
    assert int(response["Retry-After"]) >= 1


# --- 4. a chunked upload over the limit ----------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_chunked_upload_answers_413_over_the_limit_and_411_under_it(operator, artifact_root,
                                                                       store):
    from knox.models import AuthToken

    from tests.conftest import free_port
    from tests.live import LivePortal

    model = factories.make_model(operator, name="chunked")
    _, token = AuthToken.objects.create(user=operator, expiry=None)
    portal = LivePortal(free_port(), artifact_root, MAX_UPLOAD_BYTES="4096").start()
    boundary = "swarm-chunked"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"artifact\"; "
            f"filename=\"m.pt\"\r\n\r\n").encode()

    def post(size_bytes: int) -> httpx.Response:
        def body():  # a generator: httpx sends it chunked, without Content-Length
            yield head
            for _ in range(size_bytes // 1024):
                yield b"\0" * 1024
            yield f"\r\n--{boundary}--\r\n".encode()

        return httpx.post(
            f"{portal.url}/api/models/{model.name}/versions/", content=body(), timeout=60,
            headers={"Authorization": f"Token {token}",
                     "Content-Type": f"multipart/form-data; boundary={boundary}"})

    try:
        over, under = post(3 * 1024**2), post(2048)
    finally:
        portal.stop()
    assert over.status_code == 413, over.text
    assert "MAX_UPLOAD_BYTES" in over.json()["error"]
    assert under.status_code == 411, under.text
    assert "Content-Length" in under.json()["error"]
    assert store.staging_names() == set()
