"""`make run`: the embedded default, supervised: portal, Celery (worker + beat), local workers.

Embedded default: SQLite and files under var/, no external server. A SECRET_KEY is
generated once into var/secret_key so sessions survive restarts. Celery uses its
filesystem broker, so the scheduler runs the same tasks as in production. The local
GPU-server provider (scaling/providers/local.py) runs the worker agents: the launcher
starts LOCAL_FLEET_MIN_NODES of them at once, so the demo deployment is served before
the auto-scaler's first tick, and the auto-scaler adds or releases more within bounds.
They join with a short-lived token (later runs reuse their stored credentials). With
SCALING_PROVIDER=static the launcher starts two fixed workers itself, as before.
Ctrl-C stops everything; the workers drain their replicas first.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from scaling.providers.local import LocalProcessProvider
from swarm_portal.env import env_int

ROOT = Path(__file__).resolve().parent.parent
# With SCALING_PROVIDER=static only: fixed workers, started and stopped with the launcher.
LOCAL_WORKERS = (("local-1", "9100-9149"), ("local-2", "9150-9199"))
WORKER_STOP_S = 40.0  # a worker drains its replicas (30 s grace) before it exits


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
    env.setdefault("SCALING_PROVIDER", "local")
    env.setdefault("LOCAL_FLEET_PORTAL_URL", _portal_url(env.get("SWARM_HOST", "127.0.0.1"),
                                                         env.get("SWARM_PORT", "8000")))
    for folder in ("celery/queue", "celery/processed"):
        (var_dir / folder).mkdir(parents=True, exist_ok=True)
    return env


def _portal_url(host: str, port: str) -> str:
    """Return the URL workers on this machine reach the portal at."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104


def _manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env,
                            check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return result.stdout


def _prepare(env: dict[str, str]) -> None:
    _manage(env, "migrate", "--no-input", "-v", "0")
    print(_manage(env, "ensure_admin"), end="", flush=True)
    print(_manage(env, "register_demo_model"), end="", flush=True)
    print(_manage(env, "ensure_demo_deployment"), end="", flush=True)
    print(_manage(env, "ensure_demo_policy"), end="", flush=True)


def _worker_command(env: dict[str, str], portal_url: str, name: str, ports: str) -> list[str]:
    cache_dir = Path(env["SWARM_VAR_DIR"]) / "workers" / name
    return [sys.executable, "-m", "serving.agent.cli", "--portal", portal_url,
            "--name", name, "--port-range", ports, "--cache-dir", str(cache_dir)]


def _start_all(env: dict[str, str], host: str, port: str) -> list[subprocess.Popen[bytes]]:
    """Start the portal and Celery; return them (Celery second)."""
    python = sys.executable
    portal = [python, "-m", "uvicorn", "swarm_portal.asgi:application", "--host", host,
              "--port", port, "--no-server-header", "--no-access-log"]
    celery = [python, "-m", "celery", "-A", "swarm_portal", "worker", "--beat",
              "--concurrency", "1", "--loglevel", "WARNING",
              "--schedule", str(Path(env["SWARM_VAR_DIR"]) / "celery" / "beat-schedule")]
    # Own sessions: Ctrl-C reaches only this supervisor, which stops the children in order.
    return [subprocess.Popen(portal, cwd=ROOT, env=env, start_new_session=True),
            subprocess.Popen(celery, cwd=ROOT, env=env, start_new_session=True)]


def local_fleet(env: dict[str, str]) -> LocalProcessProvider:
    """Return the local provider over this run's fleet (tokens come from manage.py)."""
    return LocalProcessProvider(
        Path(env["SWARM_VAR_DIR"]), env["LOCAL_FLEET_PORTAL_URL"],
        base_port=env_int("LOCAL_FLEET_BASE_PORT", 9100, minimum=1),
        create_token=lambda _name: _manage(env, "local_join_token", "--uses", "1").strip())


def _start_local_fleet(env: dict[str, str]) -> None:
    """Start LOCAL_FLEET_MIN_NODES workers (fewer if some still run from a previous run)."""
    fleet = local_fleet(env)
    missing = env_int("LOCAL_FLEET_MIN_NODES", 1, minimum=0) - len(fleet.managed_names())
    started = fleet.start_nodes(missing)
    if started:
        print(f"started {', '.join(started)} (logs in {fleet.fleet_dir})", flush=True)


def _start_fixed_workers(env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """Start local-1 and local-2 as children: the static provider adds nothing itself."""
    token = _manage(env, "local_join_token", "--uses", str(len(LOCAL_WORKERS))).strip()
    # The token goes in the environment: a command line is readable by every user (ps).
    worker_env = {**env, "SWARM_JOIN_TOKEN": token} if token else env
    return [subprocess.Popen(_worker_command(env, env["LOCAL_FLEET_PORTAL_URL"], name, ports),
                             cwd=ROOT, env=worker_env, start_new_session=True)
            for name, ports in LOCAL_WORKERS]


def _supervise(env: dict[str, str], children: list[subprocess.Popen[bytes]]) -> int:
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    failed = [child.args for child in children if child.poll() not in (None, 0)]
    portal, celery, fixed_workers = children[0], children[1], children[2:]
    # Celery first, so that no auto-scaler tick starts a worker while we stop them; then
    # the workers, while the portal still answers: they drain, then deregister.
    _stop_group([celery])
    if env["SCALING_PROVIDER"] == "local":
        local_fleet(env).stop_all(timeout_s=WORKER_STOP_S)
    _stop_group(fixed_workers)
    _stop_group([portal])
    if failed and not stopping:
        print(f"stopped because a process exited: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def _stop_group(group: list[subprocess.Popen[bytes]]) -> None:
    for child in group:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in group:
        try:
            child.wait(timeout=WORKER_STOP_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


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
    if env["SCALING_PROVIDER"] == "local":
        _start_local_fleet(env)
    else:
        children += _start_fixed_workers(env)
    print(f"Swarm Portal: http://{host}:{port}/  (log in as admin; Ctrl-C stops everything)",
          flush=True)
    sys.exit(_supervise(env, children))


if __name__ == "__main__":
    main()
