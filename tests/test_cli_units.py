"""The `swarm` CLI's pure parts in-process, and the login endpoint it uses (no server)."""

from __future__ import annotations

import json
import stat
import struct
import subprocess
import sys

import pytest
import typer
from knox.models import AuthToken
from rest_framework.test import APIClient

from swarm_cli import config
from swarm_cli.deploy import parse_weights
from swarm_cli.events import new_events
from swarm_cli.infer import bytes_request
from swarm_cli.main import _hoist_json
from swarm_portal.api_login import MAX_FAILED_LOGINS
from tests.cache_tools import clear_own_cache
from tests.live import ROOT


def test_the_cli_imports_no_django():
    code = ("import sys, swarm_cli.main; "
            "sys.exit(any(name.split('.')[0] == 'django' for name in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_new_events_are_printed_oldest_first_once():
    page = [{"id": 7}, {"id": 5}, {"id": 4}]  # the API's order: newest first
    fresh, cursor = new_events(page, 4)
    assert [row["id"] for row in fresh] == [5, 7] and cursor == 7
    assert new_events(page, cursor) == ([], 7)


def test_json_may_come_anywhere_before_a_double_dash():
    assert _hoist_json(["models", "list", "--json"]) == ["--json", "models", "list"]
    assert _hoist_json(["models", "create", "x", "--", "--json"]) == [
        "models", "create", "x", "--", "--json"]


def test_canary_weights_are_parsed_or_refused():
    assert parse_weights(["1=90", "2=10.5"]) == {"1": 90.0, "2": 10.5}
    for bad in ("1", "one=2", "1=x"):
        with pytest.raises(typer.Exit) as raised:
            parse_weights([bad])
        assert raised.value.exit_code == 1


def test_a_file_is_sent_as_one_length_prefixed_bytes_element():
    body, headers = bytes_request(b"\x89PNG...", "image")
    header_bytes = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:header_bytes])
    assert header["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 4 + 7}}
    assert body[header_bytes:] == struct.pack("<I", 7) + b"\x89PNG..."


def test_the_config_file_is_0600_even_over_a_looser_one(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("SWARM_URL", raising=False)
    monkeypatch.delenv("SWARM_TOKEN", raising=False)
    path = config.config_path()
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    path.chmod(0o644)
    config.save(config.Config("http://portal:8000", "swp_secret"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.load() == config.Config("http://portal:8000", "swp_secret")
    monkeypatch.setenv("SWARM_TOKEN", "swp_from_env")
    assert config.load().token == "swp_from_env"
    with pytest.raises(config.ConfigError, match="not a portal URL"):
        config.checked_url("ftp://portal")


@pytest.fixture
def login(db):
    clear_own_cache()
    client = APIClient()
    return lambda password: client.post("/api/auth/login/", {"username": "olga",
                                                             "password": password},
                                        format="json")


def test_login_returns_a_token_shown_once_and_stored_hashed(login, operator):
    answer = login("pw-olga")
    assert answer.status_code == 201
    token = answer.json()["token"]
    (stored,) = AuthToken.objects.filter(user=operator)
    assert token.startswith("swp_") and token not in (stored.digest, stored.token_key)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert api.get("/api/models/").status_code == 200


def test_failed_logins_lock_out_then_answer_429(login, operator):
    for _attempt in range(MAX_FAILED_LOGINS):
        refused = login("wrong")
        assert refused.status_code == 400
        assert refused.json() == {"error": "wrong username or password"}
    locked = login("pw-olga")
    assert locked.status_code == 429 and int(locked["Retry-After"]) > 0
    assert not AuthToken.objects.exists()


def test_login_refuses_unknown_fields_and_is_in_the_schema(login, operator_api):
    answer = APIClient().post("/api/auth/login/", {"username": "olga", "password": "x",
                                                   "admin": True}, format="json")
    assert answer.status_code == 400 and "admin" in answer.json()["error"]
    schema = operator_api.get("/api/schema/?format=json").json()
    documented = schema["paths"]["/api/auth/login/"]["post"]["responses"]
    assert {"201", "400", "429"} <= set(documented)
