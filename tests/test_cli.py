"""The `swarm` command line against a real portal under uvicorn, run as a subprocess.

Each command is run as a user would run it (`python -m swarm_cli`, HOME and the config
folder in tmp) and checked through its output, its exit code and the portal's database.
"""

from __future__ import annotations

import json
import os
import select
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import ANY

import httpx
import numpy as np
import pytest

from registry.models import Alias, Model, ModelVersion
from scaling.models import ScalingEvent
from serving.gateway.filesource import write_table
from serving.models import ApiKey, Deployment, JoinToken, Node
from swarm_portal.api_login import MAX_FAILED_LOGINS
from swarm_protocol.agent_messages import HeartbeatRequest, ReplicaStatus
from tests import factories
from tests.cache_tools import clear_own_cache
from tests.conftest import free_port
from tests.dashboards_helpers import gpu
from tests.gateway_helpers import (
    MLP,
    SECRET,
    StandaloneGateway,
    deployment,
    expected_scores,
    features,
    mlp_artifact,
    mlp_request,
    replica_route,
    start_replicas,
    table,
)
from tests.live import ROOT, LivePortal
from tests.replica_models import MLP_SIGNATURE

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
COMMAND_TIMEOUT_S = 180  # an upload is validated in a child process before the answer


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> object:
        return json.loads(self.stdout)


class Swarm:
    """Runs `swarm ARGS` in a subprocess with its own HOME and config folder."""

    def __init__(self, home: Path, **env: str) -> None:
        self.config_home = home / "config"
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("SWARM_") or key == "SWARM_VAR_DIR"}
        self.env.update(HOME=str(home), XDG_CONFIG_HOME=str(self.config_home), COLUMNS="200",
                        **env)

    @property
    def config_file(self) -> Path:
        return self.config_home / "swarm" / "config.json"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "swarm_cli", *args]

    def __call__(self, *args: str, stdin: str = "", **env: str) -> Run:
        done = subprocess.run(self.command(*args), cwd=ROOT, env={**self.env, **env},
                              input=stdin, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        return Run(done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str, **kwargs: str) -> Run:
        run = self(*args, **kwargs)
        assert run.code == 0, f"swarm {' '.join(args)} exited {run.code}: {run.stderr}"
        return run

    def json(self, *args: str) -> object:
        return self.ok("--json", *args).json()


def assert_one_line_error(run: Run, code: int, *fragments: str) -> None:
    """The command failed with `code` and said why on exactly one stderr line."""
    assert run.code == code, (run.code, run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swarm: error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def portal(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[LivePortal]:
    """One portal for the module, on the test database (each test brings its own rows)."""
    live = LivePortal(free_port(), tmp_path_factory.mktemp("cli-artifacts")).start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def operator(operator):
    """The operator persona, with a password the portal process can check.

    The test settings hash with MD5 (fast), which the portal's settings do not accept; a
    PBKDF2 hash with few iterations is accepted by both and stays quick to check.
    """
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    operator.password = PBKDF2PasswordHasher().encode("pw-olga", "cli-test-salt", 1000)
    operator.save(update_fields=["password"])
    return operator


@pytest.fixture
def swarm(tmp_path) -> Swarm:
    return Swarm(tmp_path / "home")


@pytest.fixture
def logged_in(swarm, portal, operator) -> Swarm:
    clear_own_cache()  # failed-login counters of an earlier test
    swarm.ok("login", portal.url, "--username", operator.username, "--password-stdin",
             stdin=f"pw-{operator.username}\n")
    return swarm


def test_login_keeps_the_token_in_a_file_only_its_owner_can_read(swarm, portal, operator):
    clear_own_cache()
    run = swarm("login", portal.url, "--username", "olga", SWARM_PASSWORD="pw-olga")
    assert run.code == 0, run.stderr
    assert stat.S_IMODE(swarm.config_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(swarm.config_file.parent.stat().st_mode) == 0o700
    stored = json.loads(swarm.config_file.read_text())
    assert stored["url"] == portal.url and stored["token"].startswith("swp_")
    assert stored["token"] not in run.stdout + run.stderr  # kept, not shown
    assert swarm.json("models", "list") == []

    wrong = swarm("login", portal.url, "--username", "olga", "--password-stdin", stdin="nope\n")
    assert_one_line_error(wrong, 2, "refused (400)", "wrong username or password")
    assert json.loads(swarm.config_file.read_text()) == stored  # a failed login keeps the old


def test_a_token_from_make_token_logs_in_from_stdin(swarm, portal, operator):
    from knox.models import AuthToken

    _instance, token = AuthToken.objects.create(user=operator, expiry=None)
    swarm.ok("login", portal.url, "--token-stdin", stdin=token + "\n")
    assert json.loads(swarm.config_file.read_text())["token"] == token
    refused = swarm("login", portal.url, "--token-stdin", stdin="swp_not-a-token\n")
    assert_one_line_error(refused, 2, "refused (401)")


def test_models_create_upload_versions_and_aliases(logged_in, model_files, tmp_path):
    swarm = logged_in
    created = swarm.json("models", "create", "mlp", "--description", "from the CLI")
    assert created["name"] == "mlp" and Model.objects.filter(name="mlp").exists()
    signature = tmp_path / "signature.json"
    signature.write_text(json.dumps(factories.SIGNATURE))
    for path in (model_files["torchscript"], model_files["torchscript_b"]):
        uploaded = swarm.json("models", "upload", "mlp", str(path), "--signature", str(signature))
        assert uploaded["sha256"] == factories.sha256_of(path)
    listed = swarm.json("models", "list")
    assert [(m["name"], m["latest_version"]) for m in listed] == [("mlp", 2)]
    assert "mlp" in swarm.ok("models", "list").stdout  # the table for people
    versions = swarm.json("versions", "mlp")
    assert sorted(v["number"] for v in versions) == [1, 2]

    swarm.ok("alias", "set", "mlp", "production", "1")
    swarm.ok("alias", "set", "mlp", "production", "2")
    assert Alias.objects.get(name="production").version.number == 2
    rolled = swarm.json("alias", "rollback", "mlp", "production")
    assert rolled["version"] == 1 == Alias.objects.get(name="production").version.number


def test_a_failed_upload_says_why_in_one_line_and_exits_2(logged_in, tmp_path):
    swarm = logged_in
    swarm.ok("models", "create", "mlp")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch archive" * 100)
    signature = json.dumps(factories.SIGNATURE)
    run = swarm("models", "upload", "mlp", str(corrupt), "--signature", signature)
    assert_one_line_error(run, 2, "refused (400)")
    assert run.stdout == ""
    assert not ModelVersion.objects.exists()
    unknown = swarm("models", "upload", "no-such-model", str(corrupt), "--signature", signature)
    assert_one_line_error(unknown, 2, "refused (404)")
    bad_json = swarm("models", "upload", "mlp", str(corrupt), "--signature", "{not json")
    assert_one_line_error(bad_json, 1, "--signature is not valid JSON")


@pytest.fixture
def two_versions(operator, model_files) -> Model:
    model = factories.make_model(operator)
    for path in (model_files["torchscript"], model_files["torchscript_b"]):
        factories.add_version(model, operator, path)
    return model


def test_deploy_create_scale_canary_rollback_delete(logged_in, two_versions):
    swarm = logged_in
    created = swarm.json("deploy", "create", "web", "--model", "mlp", "--version", "1",
                         "--replicas", "1")
    assert (created["name"], created["version"], created["replicas"]) == ("web", 1, 1)
    assert swarm.json("deploy", "scale", "web", "3")["replicas"] == 3
    assert Deployment.objects.get(name="web").replicas == 3
    split = swarm.json("deploy", "canary", "web", "1=90", "2=10")
    assert split["traffic"] == {"1": 90.0, "2": 10.0}
    assert_one_line_error(swarm("deploy", "canary", "web", "two=10"), 1, "VERSION=WEIGHT")

    rolled = swarm.json("deploy", "rollback", "web")  # the revision before the canary
    assert rolled["traffic"] == {} and rolled["replicas"] == 3
    assert [d["name"] for d in swarm.json("deploy", "list")] == ["web"]
    assert_one_line_error(swarm("deploy", "scale", "web", "9999"), 2, "refused (400)",
                          "replicas")

    swarm.ok("deploy", "delete", "web", "--yes")
    web = Deployment.objects.filter(name="web").first()
    assert web is None or web.deleting


def test_keys_and_join_tokens_show_their_secret_once(logged_in, portal, tmp_path):
    swarm = logged_in
    key = swarm.json("keys", "create", "client-a", "--rate-limit-rps", "5")
    assert key["key"].startswith("swk_")
    stored = ApiKey.objects.get(pk=key["id"])
    assert key["key"] not in json.dumps(swarm.json("keys", "list"))
    assert swarm.json("keys", "revoke", str(key["id"]))["status"] == "revoked"
    stored.refresh_from_db()
    assert stored.revoked_at is not None

    shown = swarm.ok("tokens", "create", "gpu-pool", "--uses", "2")
    secret = next(line.split("=", 1)[1] for line in shown.stdout.splitlines()
                  if line.startswith("export SWARM_JOIN_TOKEN="))
    command = shown.stdout.strip().splitlines()[-1]
    assert command == f"swarm-worker --portal {portal.url}" and secret not in command
    assert JoinToken.objects.get(name="gpu-pool").uses_left == 2

    token_file = tmp_path / "join-token"
    made = swarm.json("tokens", "create", "pool-b", "--token-file", str(token_file))
    assert made["command"] == (f"swarm-worker --portal {portal.url} "
                               f"--token-file {token_file}")
    assert made["token"] is None and token_file.read_text().startswith("swj_")
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() not in made["command"]


def test_keys_create_takes_a_limit_in_tokens_per_minute(logged_in):
    swarm = logged_in
    key = swarm.json("keys", "create", "chat", "--tokens-per-minute", "6000")
    assert key["rate_limit_tokens_per_minute"] == 6000
    assert ApiKey.objects.get(pk=key["id"]).rate_limit_tokens_per_minute == 6000
    listed = swarm.ok("keys", "list").stdout
    assert "rate_limit_tokens_per_minute" in listed and "6000" in listed
    assert_one_line_error(swarm("keys", "create", "bad", "--tokens-per-minute", "0"), 2,
                          "refused (400)", "rate_limit_tokens_per_minute")
    assert not ApiKey.objects.filter(name="bad").exists()


def test_nodes_list_and_drain(logged_in, gpu_node):
    swarm = logged_in
    listed = swarm.json("nodes", "list")
    assert [(n["name"], n["status"]) for n in listed] == [("gpu-a", gpu_node.status)]
    assert "gpu-a" in swarm.ok("nodes", "list").stdout
    drained = swarm.json("nodes", "drain", "gpu-a")
    assert drained["status"] == Node.objects.get(pk=gpu_node.pk).status == "draining"
    assert_one_line_error(swarm("nodes", "drain", "no-such-node"), 2, "no node named")


def read_line(process: subprocess.Popen[str], deadline_s: float = 60.0) -> str:
    """Return the next stdout line of `process`, failing after `deadline_s` (a CLI start
    took over 15 s once on a busy CI machine)."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], deadline_s)
    if not ready:
        process.kill()
        _, stderr = process.communicate(timeout=10)
        raise AssertionError(f"no line from swarm within {deadline_s} s; stderr: {stderr}")
    return process.stdout.readline()


def test_events_prints_recent_events_and_follows_new_ones(logged_in, served_deployment):
    swarm = logged_in
    first = ScalingEvent.objects.create(deployment=served_deployment, from_replicas=1,
                                        to_replicas=2, reason="in flight 9 > 4")
    recent = swarm.json("events", "--deployment", "mlp")
    assert [(e["id"], e["reason"]) for e in recent] == [(first.pk, "in flight 9 > 4")]
    assert "1 -> 2" in swarm.ok("events").stdout

    follower = subprocess.Popen(swarm.command("--json", "events", "--follow", "--interval-s",
                                              "0.2"), cwd=ROOT, env=swarm.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(read_line(follower))["id"] == first.pk
        second = ScalingEvent.objects.create(deployment=served_deployment, from_replicas=2,
                                             to_replicas=1, reason="idle")
        line = json.loads(read_line(follower))
        assert (line["id"], line["to_replicas"]) == (second.pk, 1)
    finally:
        follower.kill()
        follower.wait(timeout=10)


def push_lines(portal: LivePortal, node: Node, replica_id: int, lines: list[str]) -> None:
    """Send one heartbeat as the node's agent would, carrying a replica's new output."""
    status = ReplicaStatus(replica_id=replica_id, state="starting", log_lines=lines)
    body = HeartbeatRequest(devices=[gpu()], replicas=[status]).to_dict()
    reply = httpx.post(f"{portal.url}/api/agent/heartbeat", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {node.secret}"})
    assert reply.status_code == 200, reply.text


def test_logs_print_a_replicas_recent_output_and_follow_it(logged_in, portal,
                                                           served_deployment, gpu_node):
    swarm = logged_in
    replica = served_deployment.replica_set.get()
    push_lines(portal, gpu_node, replica.pk, ["loading the model", "\x1b[2Jready"])
    assert swarm.ok("logs", str(replica.pk)).stdout == "loading the model\n\\x1b[2Jready\n"
    assert swarm.ok("logs", str(replica.pk), "--tail", "1").stdout == "\\x1b[2Jready\n"
    [first, second] = swarm.json("logs", str(replica.pk))
    assert (first["seq"], first["text"]) == (1, "loading the model") and second["seq"] == 2

    follower = subprocess.Popen(swarm.command("--json", "logs", str(replica.pk), "--follow",
                                              "--tail", "1", "--interval-s", "0.2"),
                                cwd=ROOT, env=swarm.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(read_line(follower))["seq"] == 2
        push_lines(portal, gpu_node, replica.pk, ["serving"])
        assert json.loads(read_line(follower)) == {"seq": 3, "text": "serving", "at": ANY}
    finally:
        follower.kill()
        follower.wait(timeout=10)
    assert_one_line_error(swarm("logs", "999999"), 2, "refused (404)")


def test_errors_are_one_line_with_their_exit_code(swarm, portal, tmp_path):
    assert_one_line_error(swarm("models", "list"), 1, "not logged in")
    assert_one_line_error(swarm("login", "portal.example"), 1, "not a portal URL")
    nothing_there = f"http://127.0.0.1:{free_port()}"
    unreachable = swarm("models", "list", SWARM_URL=nothing_there, SWARM_TOKEN="swp_x")
    assert_one_line_error(unreachable, 3, "cannot reach")
    not_a_portal = swarm("models", "list", SWARM_URL=f"{portal.url}/healthz/x",
                         SWARM_TOKEN="swp_x")
    assert_one_line_error(not_a_portal, 2, "refused (404)")
    usage = swarm("models", "list", "--bogus")
    assert usage.code == 1 and "No such option" in usage.stderr
    help_text = swarm.ok("--help").stdout
    assert "Exit codes" in help_text and "refused by the portal" in help_text


def test_json_goes_anywhere_on_the_line(logged_in, model):
    assert logged_in.ok("models", "list", "--json").json()[0]["name"] == "mlp"
    assert logged_in.ok("--json", "models", "list").json()[0]["name"] == "mlp"


def test_failed_logins_are_rate_limited(swarm, portal, operator):
    clear_own_cache()
    for _attempt in range(MAX_FAILED_LOGINS - 1):  # straight to the API: quicker
        wrong = {"username": "olga", "password": "wrong"}
        assert httpx.post(f"{portal.url}/api/auth/login/", json=wrong).status_code == 400
    run = swarm("login", portal.url, "--username", "olga", "--password-stdin", stdin="wrong\n")
    assert_one_line_error(run, 2, "refused (400)")
    locked = swarm("login", portal.url, "--username", "olga", "--password-stdin",
                   stdin="pw-olga\n")  # the right password, too late
    assert_one_line_error(locked, 2, "refused (429)", "too many failed logins")
    assert not swarm.config_file.exists()
    clear_own_cache()
    swarm.ok("login", portal.url, "--username", "olga", "--password-stdin", stdin="pw-olga\n")


@pytest.fixture
def gateway(tmp_path) -> Iterator[StandaloneGateway]:
    """A standalone gateway in front of one real replica of the tabular MLP."""
    (replica,) = start_replicas(tmp_path, [(mlp_artifact(tmp_path), MLP_SIGNATURE,
                                            {"name": MLP, "version": 1})])
    table_path = tmp_path / "table.json"
    write_table(table_path, table(deployment(MLP, [replica_route(replica, 1)])))
    process = None
    try:
        process = StandaloneGateway(table_path)
        yield process
    finally:
        if process is not None:
            process.stop()
        replica.stop()


def test_infer_sends_a_json_request_or_a_file_as_bytes(swarm, gateway, tmp_path):
    rows = features(2)
    request = tmp_path / "request.json"
    request.write_text(json.dumps(mlp_request(rows)))
    with_key = {"SWARM_API_KEY": SECRET}
    reply = swarm.ok("--json", "infer", MLP, "--input", str(request), "--gateway", gateway.url,
                     **with_key).json()
    (scores,) = reply["outputs"]
    assert scores["shape"] == [2, 3]
    assert np.allclose(np.array(scores["data"]).reshape(2, 3), expected_scores(rows), atol=1e-5)
    assert swarm.ok("infer", MLP, "--input", str(request), "--gateway", gateway.url,
                    **with_key).stdout.startswith("scores FP32 [2, 3]: [")

    image = tmp_path / "image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    # The MLP's only input (from its metadata) takes FP32: the BYTES request is refused.
    as_bytes = swarm("infer", MLP, "--input", str(image), "--gateway", gateway.url, **with_key)
    assert_one_line_error(as_bytes, 2, "refused (400)")
    assert_one_line_error(swarm("infer", MLP, "--input", str(request), "--gateway",
                                gateway.url), 1, "SWARM_API_KEY")
    assert_one_line_error(swarm("infer", MLP, "--input", str(request), "--gateway",
                                gateway.url, SWARM_API_KEY="swk_wrong"), 2, "refused (401)")
