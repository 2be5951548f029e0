"""`make run`: the embedded default, supervised: portal, Celery (worker + beat), two workers.

Embedded default: SQLite and files under var/, no external server. A SECRET_KEY is
generated once into var/secret_key so sessions survive restarts. Celery uses its
filesystem broker, so the scheduler runs the same tasks as in production. Two local
worker agents join with a short-lived token (later runs reuse their stored
credentials) and serve the demo deployment. Ctrl-C stops everything; the workers
drain their replicas first.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_WORKERS = (("local-1", "9100-9149"), ("local-2", "9150-9199"))


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
    env["SWARM_VAR_DIR"] = str(var_dir)
    env.setdefault("SECRET_KEY", _secret_key(var_dir))
    # Served over plain http on localhost: cookies cannot be Secure-only there.
    env.setdefault("SECURE_COOKIES", "0")
    env.setdefault("DJANGO_SETTINGS_MODULE", "swarm_portal.settings")
    for folder in ("celery/queue", "celery/processed"):
        (var_dir / folder).mkdir(parents=True, exist_ok=True)
    return env


def _manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env,
                            check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return result.stdout


def _prepare(env: dict[str, str]) -> None:
    _manage(env, "migrate", "--no-input", "-v", "0")
    print(_manage(env, "ensure_admin"), end="", flush=True)
    print(_manage(env, "register_demo_model"), end="", flush=True)
    print(_manage(env, "ensure_demo_deployment"), end="", flush=True)


def _worker_command(env: dict[str, str], portal_url: str, name: str, ports: str,
                    token: str) -> list[str]:
    cache_dir = Path(env["SWARM_VAR_DIR"]) / "workers" / name
    command = [sys.executable, "-m", "serving.agent.cli", "--portal", portal_url,
               "--name", name, "--port-range", ports, "--cache-dir", str(cache_dir)]
    return [*command, "--token", token] if token else command


def _start_all(env: dict[str, str], host: str, port: str) -> list[subprocess.Popen[bytes]]:
    python = sys.executable
    portal = [python, "-m", "uvicorn", "swarm_portal.asgi:application", "--host", host,
              "--port", port, "--no-server-header", "--no-access-log"]
    celery = [python, "-m", "celery", "-A", "swarm_portal", "worker", "--beat",
              "--concurrency", "1", "--loglevel", "WARNING",
              "--schedule", str(Path(env["SWARM_VAR_DIR"]) / "celery" / "beat-schedule")]
    # Own sessions: Ctrl-C reaches only this supervisor, which stops the children in order.
    children = [subprocess.Popen(portal, cwd=ROOT, env=env, start_new_session=True),
                subprocess.Popen(celery, cwd=ROOT, env=env, start_new_session=True)]
    portal_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
    token = _manage(env, "local_join_token", "--uses", str(len(LOCAL_WORKERS))).strip()
    for name, ports in LOCAL_WORKERS:
        command = _worker_command(env, portal_url, name, ports, token)
        children.append(subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True))
    return children


def _supervise(children: list[subprocess.Popen[bytes]]) -> int:
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    failed = [child.args for child in children if child.poll() not in (None, 0)]
    portal_and_celery, workers = children[:2], children[2:]
    # Workers first, while the portal still answers: they drain, then deregister.
    for group in (workers, portal_and_celery):
        for child in group:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in group:
            try:
                child.wait(timeout=40)
            except subprocess.TimeoutExpired:
                child.kill()
    if failed and not stopping:
        print(f"stopped because a process exited: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    env = embedded_environment()
    if sys.argv[1:2] == ["manage"]:
        # `python -m swarm_portal.launcher manage CMD ...`: manage.py on the embedded default.
        command = [sys.executable, str(ROOT / "manage.py"), *sys.argv[2:]]
        os.execvpe(sys.executable, command, env)  # noqa: S606
    host = env.get("SWARM_HOST", "127.0.0.1")
    port = env.get("SWARM_PORT", "8000")
    _prepare(env)
    children = _start_all(env, host, port)
    print(f"Swarm Portal: http://{host}:{port}/  (log in as admin; Ctrl-C stops everything)",
          flush=True)
    sys.exit(_supervise(children))


if __name__ == "__main__":
    main()
