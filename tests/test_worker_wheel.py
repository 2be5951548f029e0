"""The worker installs on its own: swarm-worker's wheel in a clean venv, without the portal.

The slow tests build worker/'s wheel with `make worker-wheel`, as the README's GPU server
install does, in a copy of just the worker's packages. One checks what the target leaves and
ships; the other installs the wheel with its dependencies in a fresh virtual environment (no
system site-packages), and checks that no web-portal package came along, that both commands
start, and that a replica from that environment serves a real model. The fast ones compile
the worker's modules with every other Python the machine has (the worker supports 3.10 to
3.13; the portal runs 3.11).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.gateway_helpers import expected_scores, features, mlp_artifact, mlp_request
from tests.replica_models import (
    KEY,
    MLP_SIGNATURE,
    ReplicaProcess,
    free_port,
    replica_command,
    wait_until_ready,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# What worker/pyproject.toml packages: copied alone, so the wheel cannot lean on anything else.
WORKER_TREES = ("swarm_protocol", "serving/agent", "serving/replica")
PORTAL_ONLY = ("django", "celery", "channels", "rest_framework", "knox", "drf_spectacular")
PYENV_VERSIONS = Path.home() / ".pyenv" / "versions"
INSTALL_TIMEOUT_S = 600


def worker_sources() -> list[Path]:
    """Return every Python file the worker's wheel ships."""
    return sorted(path for tree in WORKER_TREES for path in (REPO_ROOT / tree).rglob("*.py"))


def other_pythons() -> list[Path]:
    """Return the pyenv interpreters for the worker's other supported versions, where present."""
    found = []
    for minor in ("3.10", "3.12", "3.13"):
        candidates = sorted(PYENV_VERSIONS.glob(f"{minor}.*/bin/python"))
        if candidates:
            found.append(candidates[-1])
    return found


@pytest.mark.parametrize("python", other_pythons(), ids=lambda path: path.parent.parent.name)
def test_the_worker_compiles_on_its_other_pythons(python: Path) -> None:
    # compile() in memory: no .pyc for other versions left in the tree.
    code = ("import sys\n"
            "for path in sys.argv[1:]:\n"
            "    compile(open(path, encoding='utf-8').read(), path, 'exec')\n")
    result = subprocess.run([str(python), "-c", code, *map(str, worker_sources())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_worker_sources_are_what_the_wheel_packages() -> None:
    # A new worker package must be added to worker/pyproject.toml and WORKER_TREES alike.
    text = (REPO_ROOT / "worker" / "pyproject.toml").read_text()
    assert 'packages = ["swarm_protocol", "serving.agent", "serving.replica"]' in text
    assert len(worker_sources()) > 30


def copy_worker_sources(directory: Path) -> Path:
    """Return a checkout holding only the worker's packages, worker/ and the Makefile."""
    source = directory / "source"
    for tree in WORKER_TREES:
        shutil.copytree(REPO_ROOT / tree, source / tree,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "worker", source / "worker",
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    # Linked, not copied: make compares the venv's install stamp with their times.
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        (source / name).symlink_to(REPO_ROOT / name)
    return source


def make_worker_wheel(source: Path) -> Path:
    """Run `make worker-wheel` in `source`, as the README does; return the wheel it built."""
    env = {**os.environ, "VENV": sys.prefix}
    # An out-of-date venv would be reinstalled first, its editable install pointed at `source`.
    up_to_date = subprocess.run(["make", "-q", "install"], cwd=source, env=env).returncode == 0
    assert up_to_date, f"{sys.prefix} is not up to date with pyproject.toml: run make install"
    result = subprocess.run(["make", "-s", "worker-wheel"], cwd=source, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = (source / "dist").glob("swarm_worker-*.whl")
    return wheel


def build_wheel(directory: Path) -> Path:
    """Build swarm-worker's wheel with make, from a copy holding only the worker's packages."""
    return make_worker_wheel(copy_worker_sources(directory))


def files_under(directory: Path) -> set[Path]:
    """Return every file under `directory`."""
    return {path for path in directory.rglob("*") if not path.is_dir()}


@pytest.mark.slow
def test_make_worker_wheel_ships_the_current_sources_and_leaves_only_the_wheel(
        tmp_path: Path) -> None:
    source = copy_worker_sources(tmp_path)
    # What an earlier plain `pip wheel ./worker` leaves: setuptools would ship it again.
    stale = source / "worker" / "build" / "lib" / "serving" / "agent" / "deleted_since.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("GONE = True\n")
    before = files_under(source) - {stale}

    wheel = make_worker_wheel(source)

    assert files_under(source) == before | {wheel}
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {"swarm_protocol/__init__.py", "serving/agent/cli.py",
            "serving/replica/__main__.py"} <= set(names)
    assert not [name for name in names if "deleted_since" in name]
    assert not [name for name in names if name.startswith(("swarm_portal", "registry"))]


def install_in_clean_venv(directory: Path, wheel: Path) -> Path:
    """Create a venv without system site-packages, install the wheel; return its bin/."""
    venv = directory / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # pip's own configuration (PIP_FIND_LINKS and the machine's indexes) finds the
    # dependencies; constraints.txt pins torch to the CPU wheel on this machine's disk.
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--prefer-binary",
         "-c", str(REPO_ROOT / "constraints.txt"), str(wheel)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return venv / "bin"


def run_in(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command of the venv from `cwd` (not the repository: nothing imports from it)."""
    command = [str(bin_dir / args[0]), *args[1:]]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def serve_a_model(bin_dir: Path, directory: Path) -> None:
    """Start a replica from the venv on a real TorchScript model; check one inference."""
    signature = directory / "signature.json"
    signature.write_text(json.dumps(MLP_SIGNATURE))
    port = free_port()
    command = replica_command(mlp_artifact(directory), "torchscript", signature, port)
    command[0] = str(bin_dir / "python")
    stderr_path = directory / "replica.stderr"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(command, cwd=directory, env={**env, "SWARM_REPLICA_KEY": KEY},
                                   stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    replica = ReplicaProcess(process, port, stderr_path)
    try:
        wait_until_ready(replica)
        rows = features(3)
        with replica.client() as client:
            response = client.post("/v2/models/model/infer", json=mlp_request(rows))
        assert response.status_code == 200, response.text
        scores = np.array(response.json()["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(scores.reshape(3, -1), expected_scores(rows), rtol=1e-5)
    finally:
        replica.stop()


@pytest.mark.slow
def test_the_worker_wheel_installs_and_runs_without_the_portal(tmp_path: Path) -> None:
    bin_dir = install_in_clean_venv(tmp_path, build_wheel(tmp_path))
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    found = run_in(bin_dir, "python", "-c",
                   "import importlib.util as u, sys; print([m for m in sys.argv[1:] "
                   "if u.find_spec(m)])", *PORTAL_ONLY, cwd=outside)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"
    django = run_in(bin_dir, "python", "-c", "import django", cwd=outside)
    assert "No module named 'django'" in django.stderr

    worker_help = run_in(bin_dir, "swarm-worker", "--help", cwd=outside)
    assert worker_help.returncode == 0, worker_help.stderr
    assert "--portal" in worker_help.stdout
    for replica_help in (run_in(bin_dir, "python", "-m", "serving.replica", "--help", cwd=outside),
                         run_in(bin_dir, "swarm-replica", "--help", cwd=outside)):
        assert replica_help.returncode == 0, replica_help.stderr
        assert "--artifact" in replica_help.stdout

    serve_a_model(bin_dir, outside)
