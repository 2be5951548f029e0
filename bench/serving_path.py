"""Benchmark `make run`'s serving path: replica direct vs the gateway vs nginx, in ONE run.

Run by hand (not a test), from the repository root, with wrk and nginx installed
(`apt-get install wrk nginx-light`):

    python bench/serving_path.py            # 5 s per cell, concurrency 1, 16 and 64, 3 rounds

It starts the real `make run` launcher (`python -m swarm_portal.launcher`) in a temporary
SWARM_VAR_DIR on free ports, and through the REST API registers the reference MLP
(TorchScript, 64 -> 256 -> 256 -> 10, FP32; bench/replica.py) and deploys it as `mlp` on one
replica with max_batch_size 32 and a 2 ms queue delay, and creates an API key. Then, for
each concurrency, wrk (one thread, keep-alive, one row per JSON request) alternates over
the targets for `--rounds` rounds and each cell reports the median round:

- `direct`: the replica the worker agent started, with its replica key;
- `gateway`: make run's URL, `/v2/models/mlp/infer` with the API key: authentication,
  balancing, metrics, everything a user's request goes through;
- `nginx`: nginx 1 worker, keep-alive upstream, in front of the same replica.

CPU per request is read from /proc for the replica and for every gateway process of the
instance (summed). Compare ratios within one run; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import add_cell_options
from gateway_load import Target, cpu_s, run_wrk, wrk_script
from replica import free_port, request_body, save_reference_mlp

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = "mlp"  # gateway.INFER_PATH names it
SIGNATURE = ('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}], '
             '"outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}')
READY_DEADLINE_S = 180.0
NGINX_CONF = """
worker_processes 1;
daemon off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    upstream replica { server 127.0.0.1:%(replica_port)d; keepalive 128; }
    server {
        listen 127.0.0.1:%(port)d;
        location / {
            proxy_pass http://replica;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
"""


@dataclass
class Instance:
    """A running launcher and what the benchmark made in it."""

    process: subprocess.Popen[bytes]
    url: str
    var_dir: Path
    api_key: str = ""
    replica_port: int = 0
    replica_key: str = ""


def wait(condition, what: str, deadline_s: float = READY_DEADLINE_S):
    """Return condition()'s first truthy value, polling until the deadline."""
    end_s = time.monotonic() + deadline_s
    while time.monotonic() < end_s:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what}")


def start_instance(directory: Path) -> Instance:
    """Start make run's launcher on free ports; return once the portal answers."""
    port = free_port()
    var_dir = directory / "var"
    env = {**os.environ, "SWARM_VAR_DIR": str(var_dir), "SWARM_PORT": str(port),
           "SWARM_GRPC_PORT": str(free_port()), "SWARM_ADMIN_PASSWORD": secrets.token_hex(12),
           "LOCAL_FLEET_BASE_PORT": str(20000 + port % 20000), "LOCAL_FLEET_MAX_NODES": "1"}
    log = (directory / "launcher.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "swarm_portal.launcher"], cwd=REPO_ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise SystemExit(f"the launcher exited; see {directory / 'launcher.log'}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait(answers, "the portal")
    return Instance(process, url, var_dir)


def manage(instance: Instance, *args: str) -> str:
    """Run a management command on the instance's embedded default; return its stdout."""
    env = {**os.environ, "SWARM_VAR_DIR": str(instance.var_dir)}
    return subprocess.run([sys.executable, "-m", "swarm_portal.launcher", "manage", *args],
                          cwd=REPO_ROOT, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def ok(response: httpx.Response) -> httpx.Response:
    """Return the response, or stop with its status and body."""
    if response.is_error:
        raise SystemExit(f"{response.request.method} {response.request.url}: "
                         f"{response.status_code} {response.text[:500]}")
    return response


def deploy_reference(instance: Instance, directory: Path) -> None:
    """Register and deploy the reference MLP on one replica; fill in key and replica."""
    token = manage(instance, "create_api_token", "admin").splitlines()[-1]
    api = httpx.Client(base_url=instance.url, timeout=120,
                       headers={"Authorization": f"Token {token}"})
    ok(api.post("/api/models/", json={"name": DEPLOYMENT}))
    artifact = save_reference_mlp(directory)
    with artifact.open("rb") as file:
        ok(api.post(f"/api/models/{DEPLOYMENT}/versions/", files={"artifact": file},
                    data={"signature": SIGNATURE}))
    ok(api.post("/api/deployments/", json={
        "name": DEPLOYMENT, "model": DEPLOYMENT, "version": 1, "replicas": 1, "max_batch_size": 32,
        "max_queue_delay_ms": 2.0, "threads": 1, "device": "cpu"}))
    created = ok(api.post("/api/api-keys/", json={"name": "bench"}))
    instance.api_key = created.json()["key"]

    def ready_port() -> int | None:
        rows = api.get("/api/replicas/", params={"deployment": DEPLOYMENT}).json()
        rows = rows.get("results", rows) if isinstance(rows, dict) else rows
        return next((r["port"] for r in rows if r["state"] == "ready"), None)

    instance.replica_port = wait(ready_port, "the replica to be ready")
    instance.replica_key = replica_key(instance.replica_port)


def _processes(marker: str) -> list[tuple[int, list[str], dict[str, str]]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if not any(marker in part for part in argv):
                continue
            environ = dict(line.split("=", 1) for line in
                           (entry / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in line)
        except OSError:
            continue
        found.append((int(entry.name), argv, environ))
    return found


def replica_key(port: int) -> str:
    """Return the key of the replica listening on `port` (from its environment)."""
    for _pid, argv, environ in _processes("serving.replica"):
        if "--port" in argv and argv[argv.index("--port") + 1] == str(port):
            return environ["SWARM_REPLICA_KEY"]
    raise SystemExit(f"no replica process on port {port}")


def process_ids(instance: Instance, marker: str) -> list[int]:
    """Return the pids whose command line has `marker` and that belong to the instance."""
    return [pid for pid, _argv, environ in _processes(marker)
            if environ.get("SWARM_VAR_DIR") == str(instance.var_dir)]


def start_nginx(directory: Path, replica_port: int,
                headers: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """Start nginx (one worker, keep-alive upstream) in front of the replica."""
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF % {"dir": directory, "port": port,
                                  "replica_port": replica_port})
    process = subprocess.Popen(["nginx", "-p", str(directory), "-c", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", headers=headers,
                             timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait(answers, f"nginx (see {directory / 'nginx-error.log'})", 20)
    except BaseException:
        process.terminate()
        process.wait(timeout=10)
        raise
    return process, port


@dataclass
class Cell:
    target: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: dict[str, float]  # per request: "replica", "gateway" (all processes), "nginx"


def measure_cell(target: Target, concurrency: int, args: argparse.Namespace,
                 script: Path, pids: dict[str, list[int]]) -> Cell:
    """Warm up, then run wrk once with CPU read around it."""
    run_wrk(target, concurrency, args.warm_up_s, 1, script)
    before = {name: sum(cpu_s(pid) for pid in group) for name, group in pids.items()}
    (requests, duration_us, p50_us, p99_us, not_ok, failed), _client_s = run_wrk(
        target, concurrency, args.duration_s, 1, script)
    used = {name: sum(cpu_s(pid) for pid in group) - before[name]
            for name, group in pids.items()}
    return Cell(target.name, concurrency, requests / (duration_us / 1e6), p50_us / 1000,
                p99_us / 1000, not_ok + failed,
                {name: s / max(1, requests) * 1e6 for name, s in used.items()})


def measure(targets: list[Target], args: argparse.Namespace, directory: Path,
            pids: dict[str, list[int]]) -> list[Cell]:
    body = request_body()
    cells = []
    for concurrency in args.concurrency:
        rounds: dict[str, list[Cell]] = {t.name: [] for t in targets}
        for _ in range(args.rounds):
            for target in targets:
                script = wrk_script(target, body, directory)
                rounds[target.name].append(measure_cell(target, concurrency, args, script,
                                                        pids))
        for target in targets:
            ordered = sorted(rounds[target.name], key=lambda cell: cell.requests_per_s)
            cells.append(ordered[len(ordered) // 2])
            print(f"  {target.name:8} c={concurrency:<3} {cells[-1].requests_per_s:8.0f} "
                  f"req/s p50 {cells[-1].p50_ms:.3f} ms", file=sys.stderr)
    return cells


def print_report(cells: list[Cell], args: argparse.Namespace, load_before: str,
                 gateway_processes: int) -> None:
    print(f"\nserving-path benchmark: {args.duration_s} s per cell, median of {args.rounds} "
          f"alternating rounds, wrk 1 thread, {os.cpu_count()} CPUs, {gateway_processes} "
          "gateway process(es)")
    print(f"load average before: {load_before}; after: {os.getloadavg()}\n")
    print("| target | concurrency | requests/s | p50 ms | p99 ms | errors | replica CPU us/req "
          "| gateway CPU us/req | nginx CPU us/req |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        gateway = f"{c.cpu_us['gateway']:.0f}" if c.target == "gateway" else "-"
        nginx = f"{c.cpu_us['nginx']:.0f}" if c.target == "nginx" else "-"
        print(f"| {c.target} | {c.concurrency} | {c.requests_per_s:,.0f} | {c.p50_ms:.3f} | "
              f"{c.p99_ms:.2f} | {c.errors} | {c.cpu_us['replica']:.0f} | {gateway} | {nginx} |")
    print("\n| concurrency | target | throughput vs direct | p50 - direct | p99 / direct p99 |")
    print("|---|---|---|---|---|")
    for concurrency in args.concurrency:
        row = {c.target: c for c in cells if c.concurrency == concurrency}
        direct = row.pop("direct")
        for name, c in row.items():
            print(f"| {concurrency} | {name} | {c.requests_per_s / direct.requests_per_s:.2f} | "
                  f"{c.p50_ms - direct.p50_ms:+.3f} ms | {c.p99_ms / direct.p99_ms:.2f} |")


def run(args: argparse.Namespace) -> None:
    load_before = str(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as name:
        directory = Path(name)
        instance = start_instance(directory)
        nginx = None
        try:
            deploy_reference(instance, directory)
            replica_headers = {"Authorization": f"Bearer {instance.replica_key}",
                               "Content-Type": "application/json"}
            nginx, nginx_port = start_nginx(directory, instance.replica_port, replica_headers)
            targets = [
                Target("direct", f"http://127.0.0.1:{instance.replica_port}", replica_headers),
                Target("gateway", instance.url, {"Authorization": f"Bearer {instance.api_key}",
                                                 "Content-Type": "application/json"}),
                Target("nginx", f"http://127.0.0.1:{nginx_port}", replica_headers)]
            replica_pid = next(pid for pid, argv, _env in _processes("serving.replica")
                               if str(instance.replica_port) in argv)
            pids = {"replica": [replica_pid],
                    "gateway": process_ids(instance, "serving.gateway"),
                    "nginx": [int(p) for p in subprocess.run(
                        ["pgrep", "-P", str(nginx.pid)], capture_output=True,
                        text=True).stdout.split()] + [nginx.pid]}
            print(f"gateway processes: {len(pids['gateway'])}", file=sys.stderr)
            print_report(measure(targets, args, directory, pids), args, load_before,
                         len(pids["gateway"]))
        finally:
            if nginx is not None:
                nginx.terminate()
                nginx.wait(timeout=10)
            instance.process.terminate()
            instance.process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_options(parser)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install wrk nginx-light)")
    run(args)


if __name__ == "__main__":
    main()
