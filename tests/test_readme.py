"""Every shell and Python block of README.md runs, as written, against a running `make run`.

The launcher (`python -m swarm_portal.launcher`, what `make run` runs) starts in the test's
own folder on free ports, on the embedded default (SQLite, no Redis: DATABASE_URL and
REDIS_URL are not passed on). The blocks run in order in one shell, in a scratch folder
that has the repository's Makefile (so `make -s api-key` works as written); the only
rewrite is the port: `127.0.0.1:8000` becomes the test's. `curl` fails on an HTTP error
status here (a wrapper adds --fail-with-body), so a snippet that answers 4xx fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos_helpers import Launcher
from tests.readme_blocks import Shell, read_blocks, run_python
from tests.replica_models import free_port
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK_TIMEOUT_S = 180.0
CURL_WRAPPER = '#!/bin/sh\nexec /usr/bin/curl --fail-with-body --silent --show-error "$@"\n'


def test_read_blocks_finds_fences_and_skip_reasons() -> None:
    text = ("intro\n```sh\necho one\n```\n<!-- readme-test: skip: needs a GPU -->\n"
            "```python\nprint(2)\n```\n```text\nnot code\n```\n")
    blocks = read_blocks(text)
    assert [(b.language, b.runnable, b.skip_reason) for b in blocks] == [
        ("sh", True, None), ("python", False, "needs a GPU"), ("text", False, None)]
    assert blocks[0].code == "echo one\n" and blocks[0].line == 2


def test_shell_keeps_variables_and_fails_on_any_command(tmp_path: Path) -> None:
    shell = Shell(tmp_path, {"PATH": os.environ["PATH"]})
    try:
        assert shell.run("NAME=swarm\nexport KEY=k1\n", 10)[0]
        ok, output = shell.run("false\necho \"still $NAME\"\n", 10)
        assert not ok and "still swarm" in output and "failed: line 1" in output
        assert shell.run("echo $NAME | grep -q swarm\n", 10)[0]
        assert not shell.run("true | false | true\n", 10)[0]  # pipefail
        assert shell.run("printf 'no newline at the end'\n", 10) == (
            True, "no newline at the end\n")
        assert shell.exported()["KEY"] == "k1"
    finally:
        shell.close()


def test_readme_skips_only_with_a_reason_and_runs_most_blocks() -> None:
    blocks = [b for b in read_blocks(README.read_text()) if b.language in ("sh", "python")]
    skipped = [b for b in blocks if not b.runnable]
    assert all(b.skip_reason and len(b.skip_reason) > 10 for b in skipped)
    assert len(blocks) - len(skipped) >= 2 * len(skipped), [b.line for b in skipped]


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path / "var", free_port(), "", free_port() % 20000 + 20000)
    launcher.env.update({"LOCAL_FLEET_MIN_NODES": "1", "SWARM_GRPC_PORT": str(free_port())})
    launcher.start()
    try:
        wait_until(lambda: _answers(f"{launcher.url}/healthz"), 120, "make run's portal", 0.5)
        key = launcher.manage("create_api_key", "--name", "readme-test-wait").splitlines()[-1]
        for demo in ("demo-mlp", "demo-digits", "tiny-lm"):
            wait_until(lambda demo=demo: _answers(f"{launcher.url}/v2/models/{demo}/ready", key),
                       180, f"{demo} to be ready", 0.5)
        _assert_quiet_console(launcher.var_dir.parent / "launcher.log")
        yield launcher
    finally:
        assert launcher.stop() == 0


def _assert_quiet_console(console: Path) -> None:
    """make run's console: the password, the URL and where the rest is; no log chatter."""
    lines = [line for line in console.read_text().splitlines() if line.strip()]
    assert any(line.startswith("Swarm Portal: http://") for line in lines), lines
    chatter = [line for line in lines if " INFO " in line or "INFO:" in line
               or "celery@" in line or "GATEWAY READY" in line or "Warning" in line]
    assert not chatter and len(lines) <= 6, lines


def _answers(url: str, key: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        return httpx.get(url, headers=headers, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _workdir(tmp_path: Path, var_dir: Path) -> Path:
    """A scratch folder where the README's relative commands work as in a checkout."""
    work = tmp_path / "reader"
    (work / "bin").mkdir(parents=True)
    # worker/ for `make worker-wheel`: its packages are found through the link, in ROOT.
    for name in ("Makefile", "pyproject.toml", "constraints.txt", "worker"):
        (work / name).symlink_to(ROOT / name)
    (work / ".venv").symlink_to(sys.prefix)
    (work / "var").symlink_to(var_dir)  # make run's folder, as in a checkout
    curl = work / "bin" / "curl"
    curl.write_text(CURL_WRAPPER)
    curl.chmod(0o755)
    return work


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_readme_block_runs_against_make_run(instance: Launcher, tmp_path: Path) -> None:
    work = _workdir(tmp_path, instance.var_dir)
    env = {**instance.env, "VENV": sys.prefix, "PATH": f"{work / 'bin'}:{os.environ['PATH']}"}
    # `make -s api-key` installs first when the venv is older than pyproject.toml: from this
    # folder that would point the editable install here. `make test` has just installed.
    up_to_date = subprocess.run(["make", "-q", "install"], cwd=work, env=env).returncode == 0
    assert up_to_date, f"{sys.prefix} is not up to date with pyproject.toml: run make install"
    shell = Shell(work, env)
    ran = 0
    try:
        for block in read_blocks(README.read_text()):
            if not block.runnable:
                continue
            code = block.code.replace("127.0.0.1:8000", f"127.0.0.1:{instance.port}")
            code = code.replace("127.0.0.1:8001", f"127.0.0.1:{instance.env['SWARM_GRPC_PORT']}")
            if block.language == "sh":
                ok, output = shell.run(code, BLOCK_TIMEOUT_S)
            else:
                ok, output = run_python(code, work, {**env, **shell.exported()},
                                        BLOCK_TIMEOUT_S)
            assert ok, f"README.md line {block.line} ({block.language}) failed:\n{output}"
            ran += 1
    finally:
        shell.close()
    assert ran >= 5
