"""`swarm-worker`: its options, the real process under SIGTERM, and its import hygiene."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serving.agent import cli
from serving.agent.agent import EXIT_REVOKED
from tests.agent_fakes import JOIN_TOKEN, FakePortal
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def portal() -> Iterator[FakePortal]:
    with FakePortal() as running:
        yield running


def test_options_become_the_agent_config(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args([
        "--portal", "https://portal.example/", "--name", "gpu-7",
        "--address", "gpu-7.example", "--port-range", "9200-9209", "--cost-per-hour", "2.5",
        "--cache-dir", str(tmp_path), "--label", "zone=eu", "--label", "tier = spot"])

    config = cli.config_from_args(args, "t")

    assert config.portal_url == "https://portal.example"
    assert config.port_range == range(9200, 9210)
    assert config.labels == {"zone": "eu", "tier": "spot"}
    assert config.bind_host == "0.0.0.0"  # noqa: S104 - reachable from the portal elsewhere
    assert config.heartbeat_interval_s is None  # follow the portal
    assert (config.cost_per_hour, config.name, config.join_token) == (2.5, "gpu-7", "t")


def test_a_loopback_address_keeps_replicas_on_loopback(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["--portal", "http://127.0.0.1:8000"])

    config = cli.config_from_args(args)

    assert (config.address, config.bind_host) == ("127.0.0.1", "127.0.0.1")
    assert config.cache_dir == Path("~/.cache/swarm-worker").expanduser()


@pytest.mark.parametrize("bad", [
    ["--portal", "ftp://portal"],
    ["--portal", "http://p", "--port-range", "9300-9200"],
    ["--portal", "http://p", "--port-range", "0-10"],
    ["--portal", "http://p", "--label", "novalue"],
    ["--portal", "http://p", "--cost-per-hour", "-1"],
    ["--portal", "http://p", "--heartbeat-interval-s", "0"],
    ["--portal", "http://p", "--device-backend", "tpu"],
])
def test_bad_options_are_refused_with_a_usage_error(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(bad)
    assert exit_info.value.code == 2


def start_worker(portal: FakePortal, tmp_path: Path, *extra: str,
                 token: str | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != cli.JOIN_TOKEN_ENV}
    if token is not None:
        env[cli.JOIN_TOKEN_ENV] = token
    return subprocess.Popen(
        [sys.executable, "-m", "serving.agent", "--portal", portal.url, "--name", "cli-box",
         "--cache-dir", str(tmp_path / "cache"), "--port-range", "19500-19509",
         "--device-backend", "cpu", *extra],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def write_token_file(path: Path, token: str, mode: int) -> Path:
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def test_the_join_token_comes_from_a_private_file_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = write_token_file(tmp_path / "token", "swj_from_file", 0o600)
    monkeypatch.setenv(cli.JOIN_TOKEN_ENV, "swj_from_env")
    parser = cli.build_parser()

    from_file = cli.join_token(parser.parse_args(["--portal", "http://p", "--token-file",
                                                  str(token_file)]))
    monkeypatch.setenv(cli.JOIN_TOKEN_ENV, "swj_from_env")
    from_env = cli.join_token(parser.parse_args(["--portal", "http://p"]))

    assert (from_file, from_env) == ("swj_from_file", "swj_from_env")
    assert cli.JOIN_TOKEN_ENV not in os.environ  # nothing started later inherits it
    assert token_file.read_text() == "swj_from_file\n"  # the user's file is left as it was


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: write_token_file(d / "token", "swj_x", 0o640), "readable by other users"),
    (lambda d: write_token_file(d / "token", "swj_x", 0o604), "chmod 600"),
    (lambda d: d, "not a regular file"),
    (lambda d: d / "missing", "cannot open"),
    (lambda d: write_token_file(d / "token", "", 0o600), "must hold one join token"),
])
def test_an_unsafe_or_unusable_token_file_is_refused_with_a_clear_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        make: Callable[[Path], Path], message: str) -> None:
    path = make(tmp_path)

    code = cli.run(["--portal", "http://127.0.0.1:9", "--cache-dir", str(tmp_path / "cache"),
                    "--token-file", str(path)])

    assert code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_a_token_on_the_command_line_is_refused_pointing_at_the_file_or_variable(
        portal: FakePortal, tmp_path: Path) -> None:
    worker = start_worker(portal, tmp_path, "--token", JOIN_TOKEN)

    assert worker.wait(timeout=30) == cli.EXIT_USAGE
    output = worker.stdout.read().decode()  # type: ignore[union-attr]
    assert "SWARM_JOIN_TOKEN" in output and "--token-file" in output
    assert portal.state.registrations == []


def heartbeats_from(portal: FakePortal, node_id: int) -> int:
    with portal.lock:
        return sum(1 for node, _ in portal.state.heartbeats if node == node_id)


@pytest.mark.slow
def test_the_worker_process_leaves_cleanly_on_sigterm_and_restarts_without_a_token(
        portal: FakePortal, tmp_path: Path) -> None:
    worker = start_worker(portal, tmp_path, token=JOIN_TOKEN)
    wait_until(lambda: heartbeats_from(portal, 1), what="the worker's first heartbeat")

    worker.send_signal(signal.SIGTERM)

    assert worker.wait(timeout=30) == 0, worker.stdout.read().decode()  # type: ignore[union-attr]
    assert portal.state.deregistered == [1]
    restarted = start_worker(portal, tmp_path)  # no token: the stored credentials suffice
    before = heartbeats_from(portal, 1)
    wait_until(lambda: heartbeats_from(portal, 1) > before, what="heartbeats after restart")
    portal.revoke(1)
    assert restarted.wait(timeout=30) == EXIT_REVOKED
    output = restarted.stdout.read().decode()  # type: ignore[union-attr]
    assert "rejected the credentials of node 1" in output
    assert len(portal.state.registrations) == 1


def test_importing_the_agent_loads_neither_django_nor_torch() -> None:
    probe = (
        "import sys, json\n"
        "import serving.agent.cli, serving.agent.agent, serving.agent.replicas\n"
        "import serving.agent.cache, serving.agent.devices, serving.agent.client\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('django', 'rest_framework', 'torch', 'celery', 'channels'))\n"
        "print(json.dumps(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, check=True,
                            env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": ""})

    assert json.loads(result.stdout) == []



@pytest.mark.parametrize(("url", "allowed"), [
    ("https://portal.example", False), ("http://127.0.0.1:8000", False),
    ("http://localhost:8000", False), ("http://[::1]:8000", False),
    ("http://10.1.2.3:8000", True), ("http://portal.lan", True)])
def test_a_plain_http_portal_is_accepted_on_loopback_or_when_allowed(url: str,
                                                                     allowed: bool) -> None:
    cli.check_portal_scheme(url, allowed)


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://portal.lan/"])
def test_a_plain_http_portal_on_a_network_address_is_refused_before_anything_runs(
        url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.ALLOW_HTTP_PORTAL_ENV, raising=False)
    assert cli.run(["--portal", url, "--device-backend", "cpu"]) == cli.EXIT_USAGE
    assert "in clear" in capsys.readouterr().err
    monkeypatch.setenv(cli.ALLOW_HTTP_PORTAL_ENV, "1")  # the lab's opt-in, kept on parse
    assert cli.build_parser().parse_args(["--portal", url]).allow_http_portal
