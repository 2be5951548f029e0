"""Project-wide checks: settings from the environment, OpenAPI, pure modules, health."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parent.parent


def run_django(env_changes: dict[str, str | None], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    env["DJANGO_SETTINGS_MODULE"] = "swarm_portal.settings"
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DEBUG": "0", "SECRET_KEY": None}, "SECRET_KEY"),
        ({"DEBUG": "maybe"}, "DEBUG"),
        ({"MAX_UPLOAD_BYTES": "lots"}, "MAX_UPLOAD_BYTES"),
        ({"DATABASE_URL": "nosuchdb://x"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_variable(env, variable):
    result = run_django(env, "check")
    assert result.returncode != 0
    assert f"environment variable {variable}" in result.stderr


def test_check_deploy_is_clean_with_production_values(tmp_path):
    result = run_django({
        "DEBUG": "0", "SECRET_KEY": "x" * 20 + "production-secret-key-value-1234567890",
        "ALLOWED_HOSTS": "portal.example.com", "SECURE_SSL_REDIRECT": "1",
        "SECURE_HSTS_SECONDS": "31536000", "SWARM_VAR_DIR": str(tmp_path), "SECURE_COOKIES": None,
    }, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_openapi_schema_generates_without_warnings(tmp_path):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    assert "/api/models/{model_name}/versions/" in text
    assert "/api/models/{model_name}/aliases/{name}/rollback/" in text


def test_pure_modules_do_not_import_django():
    code = ("import sys; import swarm_protocol.signature, registry.inspect_child, registry.storage;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'torch')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.django_db
def test_readyz_reports_a_missing_artifact_root(client, settings, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    settings.ARTIFACT_ROOT = blocker / "artifacts"
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "artifact root" in response.json()["problems"][0]
