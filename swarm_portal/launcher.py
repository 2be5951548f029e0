"""`make run`: the embedded default, supervised: portal, Celery (worker + beat), local workers.

Embedded default: SQLite and files under var/, no external server. A SECRET_KEY is
generated once into var/secret_key so sessions survive restarts. Celery's broker is a
SQLite file (swarm_portal/broker.py), so the scheduler runs the same tasks as in
production. The local GPU-server provider (scaling/providers/local.py) runs the
worker agents: the launcher starts LOCAL_FLEET_MIN_NODES of them at once, so the demo
deployment is served before the auto-scaler's first tick, and the auto-scaler adds or
releases more within bounds.
They join with a short-lived token (later runs reuse their stored credentials). With
SCALING_PROVIDER=static the launcher starts two fixed workers itself, as before.
The launcher supervises its children (swarm_portal/supervisor.py): one that dies is
restarted, with back-off. It binds the public TCP socket itself and hands it to
SWARM_GATEWAY_PROCESSES `swarm-gateway` processes (serving/gateway/service.py, `--fd`):
they serve /v2 and pass every other request through to the portal, which listens on a
unix socket under SWARM_VAR_DIR, also bound here and handed to each uvicorn it starts.
While a gateway or the portal restarts, connections wait in the kernel's backlog instead
of being refused. Ctrl-C or SIGTERM stops everything; the workers drain first, the
gateways go last (the workers reach the portal through them).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scaling.providers.local import JOIN_TOKEN_ENV, LOCAL_WORKER_ENV, LocalProcessProvider
from swarm_portal import broker, stopping
from swarm_portal.console import ErrorEcho, configure_launcher_logging, log_dir
from swarm_portal.env import env_int
from swarm_portal.supervisor import ChildSpec, Supervisor

log = logging.getLogger("swarm_portal.launcher")

ROOT = Path(__file__).resolve().parent.parent
# With SCALING_PROVIDER=static only: fixed workers, started and stopped with the launcher.
LOCAL_WORKERS = (("local-1", "9100-9149"), ("local-2", "9150-9199"))
WORKER_STOP_S = 40.0  # a worker drains its replicas (30 s grace) before it exits
CELERY_STOP_S = 20.0  # a warm shutdown finishes the task at hand
PORTAL_STOP_S = 15.0  # uvicorn finishes the requests in flight
GATEWAY_STOP_S = 25.0  # a held cold start or a download in flight finishes (20 s grace)
PORTAL, CELERY, GATEWAY = "portal", "celery", "gateway"
GATEWAY_TOKEN_NAME = "make-run"  # noqa: S105  (a name: replaced at each start)
# What no gateway needs: it reaches the portal over HTTP, never the database or the cache.
NOT_FOR_GATEWAYS = ("SECRET_KEY", "DATABASE_URL", "REDIS_URL", "SWARM_ADMIN_PASSWORD",
                    "METRICS_TOKEN", JOIN_TOKEN_ENV)
UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin
STEP_S = 0.2
BROKER_PRUNE_EVERY_S = 60.0
BROKER_KEEP_DELIVERED_S = 600.0
# Connections the kernel queues while no uvicorn accepts (a portal restart takes seconds).
LISTEN_BACKLOG = 4096
METRICS_TOKEN_FILE = "metrics_token"  # noqa: S105  (a file name)


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
    (var_dir / "celery").mkdir(parents=True, exist_ok=True)
    return env


def _portal_url(host: str, port: str) -> str:
    """Return the URL workers on this machine reach the portal at."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104


def _manage(env: dict[str, str], *args: str) -> str:
    """Run manage.py; return its stdout (its log lines go to logs/launcher.log)."""
    with (log_dir(Path(env["SWARM_VAR_DIR"])) / "launcher.log").open("ab") as log_file:
        result = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env,
                                check=True, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=log_file)
    return result.stdout.decode()


def _prepare(env: dict[str, str]) -> None:
    _manage(env, "migrate", "--no-input", "-v", "0")
    print(_manage(env, "ensure_admin"), end="", flush=True)  # the password, once
    for command in ("register_demo_model", "ensure_demo_deployment", "ensure_demo_policy"):
        for line in _manage(env, command).splitlines():
            log.info("%s", line)


def _fixed_worker_spec(env: dict[str, str], name: str, ports: str, token: str) -> ChildSpec:
    cache_dir = Path(env["SWARM_VAR_DIR"]) / "workers" / name
    command = [sys.executable, "-m", "serving.agent.cli", "--portal",
               env["LOCAL_FLEET_PORTAL_URL"], "--name", name, "--port-range", ports,
               "--cache-dir", str(cache_dir)]
    # The token in the environment, never on the command line (`ps` shows that to all).
    worker_env = {**env, **LOCAL_WORKER_ENV, **({JOIN_TOKEN_ENV: token} if token else {})}
    return ChildSpec(name, command, ROOT, worker_env, stop_timeout_s=WORKER_STOP_S)


def listen(host: str, port: int) -> socket.socket:
    """Return a TCP socket listening on host:port, for the portal's successive processes."""
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind does
    sock.bind(address)
    sock.listen(LISTEN_BACKLOG)
    return sock


def listen_unix(path: Path) -> socket.socket:
    """Return a unix socket listening at `path` (only this user may connect)."""
    path.unlink(missing_ok=True)  # left by a launcher that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: no window where others could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(LISTEN_BACKLOG)
    return sock


def portal_socket_path(var_dir: Path) -> Path:
    """Return where the portal listens: var/portal.sock, or a private folder under /tmp
    when that path is too long for a unix socket."""
    path = var_dir / "portal.sock"
    if len(str(path).encode()) <= UNIX_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="swarm-portal-")) / "portal.sock"


def _child_specs(env: dict[str, str], public: socket.socket,
                 portal_socket: socket.socket) -> list[ChildSpec]:
    """Return the gateways, the portal and Celery (the fixed workers too with
    SCALING_PROVIDER=static)."""
    python = sys.executable
    # The launcher keeps both sockets open: between one process and the next, connections
    # queue in their backlogs (up to the clients' timeouts) instead of being refused.
    fd = portal_socket.fileno()
    portal = [python, "-m", "swarm_portal.uvicorn_serve", "--fd", str(fd),
              "--backlog", str(LISTEN_BACKLOG), "--forwarded-allow-ips", "*"]
    celery = [python, "-m", "celery", "-A", "swarm_portal", "worker", "--beat",
              "--concurrency", "1", "--loglevel", "WARNING",
              "--schedule", str(Path(env["SWARM_VAR_DIR"]) / "celery" / "beat-schedule")]
    logs = log_dir(Path(env["SWARM_VAR_DIR"]))
    specs = [*_gateway_specs(env, public, str(portal_socket.getsockname())),
             ChildSpec(PORTAL, portal, ROOT, env, stop_timeout_s=PORTAL_STOP_S, pass_fds=(fd,),
                       log_path=logs / f"{PORTAL}.log"),
             ChildSpec(CELERY, celery, ROOT, env, stop_timeout_s=CELERY_STOP_S,
                       log_path=logs / f"{CELERY}.log")]
    if env["SCALING_PROVIDER"] != "local":
        token = _manage(env, "local_join_token", "--uses", str(len(LOCAL_WORKERS))).strip()
        specs += [_fixed_worker_spec(env, name, ports, token) for name, ports in LOCAL_WORKERS]
    return specs


def default_gateway_processes(cpus: int | None) -> int:
    """Return make run's gateway count: one core fewer than the machine has, 1 to 2.

    make run's replicas run on the same machine: on 2 cores two gateways took the
    replica's CPU (at concurrency 64, 7,226 requests/s and 81 us of gateway CPU each with
    two; 8,345 and 9,713 requests/s, 59 and 50 us, with one: docs/benchmarks.md). One
    gateway still loses no connection when it restarts: they wait in the launcher's
    backlog.
    """
    return max(1, min(2, (cpus or 1) - 1))


def gateway_names(env: dict[str, str]) -> list[str]:
    """Return the supervised gateways' names: gateway-1 .. gateway-N."""
    count = env_int("SWARM_GATEWAY_PROCESSES", default_gateway_processes(os.cpu_count()),
                    minimum=1)
    return [f"{GATEWAY}-{index}" for index in range(1, count + 1)]


def _gateway_specs(env: dict[str, str], public: socket.socket,
                   portal_uds: str) -> list[ChildSpec]:
    """Return one ChildSpec per gateway process, all serving the one public socket."""
    var_dir = Path(env["SWARM_VAR_DIR"])
    (var_dir / "gateway").mkdir(mode=0o700, exist_ok=True)
    for stale in (var_dir / "gateway" / "metrics").glob("*.json"):
        stale.unlink()  # a run counts from zero, without the gateways a previous run had more
    gateway_env = {key: value for key, value in env.items() if key not in NOT_FOR_GATEWAYS}
    # Given by environment: a command line is readable by every user (ps).
    gateway_env["SWARM_GATEWAY_TOKEN"] = _gateway_token(env)
    gateway_env["SWARM_GATEWAY_METRICS_TOKEN"] = _metrics_token(env)
    fd = public.fileno()
    specs = []
    for name in gateway_names(env):
        command = [sys.executable, "-m", "serving.gateway.service",
                   "--portal", env["LOCAL_FLEET_PORTAL_URL"], "--portal-uds", portal_uds,
                   "--fd", str(fd), "--host", env.get("SWARM_HOST", "127.0.0.1"),
                   "--pass-through", "--instance-id", f"make-run-{name}",
                   "--table-cache", str(var_dir / "gateway" / f"{name}-table.json"),
                   # One /metrics for them all, whichever answers the scrape.
                   "--metrics-dir", str(var_dir / "gateway" / "metrics")]
        if "GATEWAY_MAX_BODY_BYTES" in env:
            command += ["--max-body-bytes", env["GATEWAY_MAX_BODY_BYTES"]]
        grpc_port = env_int("SWARM_GRPC_PORT", 8001, minimum=0)
        if grpc_port and importlib.util.find_spec("serving.gateway.grpc_server"):
            command += ["--grpc-port", str(grpc_port)]
        specs.append(ChildSpec(name, command, ROOT, gateway_env, stop_timeout_s=GATEWAY_STOP_S,
                               pass_fds=(fd,), log_path=log_dir(var_dir) / f"{name}.log"))
    return specs


def _gateway_token(env: dict[str, str]) -> str:
    """Return a new gateway token for this run's gateways; the previous run's is revoked."""
    # Fails when there is none (a first run): nothing to revoke then.
    subprocess.run([sys.executable, str(ROOT / "manage.py"), "create_gateway_token",
                    GATEWAY_TOKEN_NAME, "--revoke"], env=env, cwd=ROOT, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _manage(env, "create_gateway_token", GATEWAY_TOKEN_NAME).strip()


def _metrics_token(env: dict[str, str]) -> str:
    """Return the gateways' /metrics token: METRICS_TOKEN, none with METRICS_PUBLIC=1,
    else the one kept in SWARM_VAR_DIR/metrics_token (made once, mode 0600)."""
    if env.get("METRICS_TOKEN"):
        return env["METRICS_TOKEN"]
    if env.get("METRICS_PUBLIC", "").lower() in ("1", "true", "yes", "on"):
        return ""
    path = Path(env["SWARM_VAR_DIR"]) / METRICS_TOKEN_FILE
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text().strip()


def local_fleet(env: dict[str, str]) -> LocalProcessProvider:
    """Return the local provider over this run's fleet (tokens come from manage.py)."""
    return LocalProcessProvider(
        Path(env["SWARM_VAR_DIR"]), env["LOCAL_FLEET_PORTAL_URL"],
        base_port=env_int("LOCAL_FLEET_BASE_PORT", 9100, minimum=1),
        create_token=lambda _name: _manage(env, "local_join_token", "--uses", "1").strip())


def _start_local_fleet(env: dict[str, str]) -> None:
    """Start LOCAL_FLEET_MIN_NODES workers (fewer if some still run from a previous run)."""
    fleet = local_fleet(env)
    running = len(fleet.managed_names())
    started = fleet.start_nodes(env_int("LOCAL_FLEET_MIN_NODES", 1, minimum=0) - running,
                                counted=running)
    if started:
        log.info("started %s (logs in %s)", ", ".join(started), fleet.fleet_dir)


def _supervise(env: dict[str, str], supervisor: Supervisor) -> int:
    """Restart what dies until SIGINT or SIGTERM; then stop everything, in order."""
    stop_requested = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    broker_file = broker.broker_file(Path(env["SWARM_VAR_DIR"]))
    next_prune_s = 0.0
    errors = ErrorEcho({spec.name: spec.log_path for spec in supervisor.specs
                        if spec.log_path is not None})
    while not stop_requested:
        supervisor.step()
        for line in errors.poll():
            print(line, flush=True)
        if time.monotonic() >= next_prune_s:
            _prune_broker(broker_file)
            next_prune_s = time.monotonic() + BROKER_PRUNE_EVERY_S
        time.sleep(STEP_S)
    _shut_down(env, supervisor)
    return 0


def _prune_broker(broker_file: Path) -> None:
    try:
        broker.prune_delivered(broker_file, older_than_s=BROKER_KEEP_DELIVERED_S)
    except sqlite3.Error as error:  # busy for 30 s: try again next time
        log.warning("could not prune the broker's delivered messages: %s", error)


def _shut_down(env: dict[str, str], supervisor: Supervisor) -> None:
    # Celery first, so that no auto-scaler tick starts a worker while we stop them; then
    # the workers, while the portal still answers: they drain, then deregister.
    print("stopping: Celery, then the workers (they drain), then the portal and the "
          "gateways", flush=True)
    stopping.mark_stopping(Path(env["SWARM_VAR_DIR"]))  # the portal re-places nothing now
    supervisor.stop([CELERY])
    if env["SCALING_PROVIDER"] == "local":
        local_fleet(env).stop_all(timeout_s=WORKER_STOP_S)
    supervisor.stop([name for name, _ports in LOCAL_WORKERS if name in supervisor.children])
    supervisor.stop([PORTAL])
    # Last: the workers reached the portal through them while they drained.
    supervisor.stop(gateway_names(env))


def _details(env: dict[str, str]) -> str:
    """Return the console's second line: gRPC, the metrics token, the logs."""
    var_dir = Path(env["SWARM_VAR_DIR"])
    grpc_port = env_int("SWARM_GRPC_PORT", 8001, minimum=0)
    parts = [f"gRPC on port {grpc_port}"] if grpc_port else []
    if (var_dir / METRICS_TOKEN_FILE).exists() and not env.get("METRICS_TOKEN"):
        parts.append(f"/metrics takes the bearer token in {var_dir / METRICS_TOKEN_FILE}")
    parts.append(f"logs in {log_dir(var_dir)}")
    return "  " + "; ".join(parts)


def main() -> None:
    env = embedded_environment()
    if sys.argv[1:2] == ["manage"]:
        # `python -m swarm_portal.launcher manage CMD ...`: manage.py on the embedded default.
        command = [sys.executable, str(ROOT / "manage.py"), *sys.argv[2:]]
        os.execvpe(sys.executable, command, env)  # noqa: S606
    host = env.get("SWARM_HOST", "127.0.0.1")
    port = env.get("SWARM_PORT", "8000")
    configure_launcher_logging(Path(env["SWARM_VAR_DIR"]))
    stopping.clear_stopping(Path(env["SWARM_VAR_DIR"]))
    _prepare(env)
    try:
        public = listen(host, env_int("SWARM_PORT", 8000, minimum=1))
    except OSError as error:  # in use, or not an address of this machine
        sys.exit(f"cannot listen on {host}:{port}: {error}")
    portal_socket = listen_unix(portal_socket_path(Path(env["SWARM_VAR_DIR"])))
    supervisor = Supervisor(_child_specs(env, public, portal_socket))
    supervisor.start_all()
    if env["SCALING_PROVIDER"] == "local":
        _start_local_fleet(env)
    print(f"Swarm Portal: http://{host}:{port}/  (log in as admin; Ctrl-C stops everything)\n"
          f"{_details(env)}", flush=True)
    sys.exit(_supervise(env, supervisor))


if __name__ == "__main__":
    main()
