"""`make run`: prepare the embedded default and serve the portal on 127.0.0.1:8000.

Embedded default: SQLite under var/, no external server. A SECRET_KEY is generated
once into var/secret_key so sessions survive restarts. Later issues add the
scheduler and local GPU workers here, supervised as child processes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _secret_key(var_dir: Path) -> str:
    path = var_dir / "secret_key"
    if not path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


def embedded_environment() -> dict[str, str]:
    """Return os.environ with the embedded defaults filled in where unset."""
    env = dict(os.environ)
    var_dir = Path(env.get("SWARM_VAR_DIR", ROOT / "var"))
    env.setdefault("SECRET_KEY", _secret_key(var_dir))
    # Served over plain http on localhost: cookies cannot be Secure-only there.
    env.setdefault("SECURE_COOKIES", "0")
    env.setdefault("DJANGO_SETTINGS_MODULE", "swarm_portal.settings")
    return env


def _manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env, check=True,
                   cwd=ROOT)


def main() -> None:
    env = embedded_environment()
    host = env.get("SWARM_HOST", "127.0.0.1")
    port = env.get("SWARM_PORT", "8000")
    _manage(env, "migrate", "--no-input", "-v", "0")
    _manage(env, "ensure_admin")
    _manage(env, "register_demo_model")
    print(f"Swarm Portal: http://{host}:{port}/  (log in as admin)", flush=True)
    server = [sys.executable, "-m", "uvicorn", "swarm_portal.asgi:application",
              "--host", host, "--port", port, "--no-server-header"]
    os.execvpe(sys.executable, server, env)  # noqa: S606 - this process becomes the server


if __name__ == "__main__":
    main()
