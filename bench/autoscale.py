"""Benchmark the auto-scaler: a 10x step in load through the gateway, on the real stack.

Run by hand (not a test), from the repository root:

    python bench/autoscale.py                        # writes docs/autoscale-sim.png too

It starts `make run`'s launcher on a fresh embedded default (SQLite, Celery on its
filesystem broker, the local provider starting `swarm-worker` processes) in a temporary
folder, registers a model of about 10-20 ms a request (tanh matmuls), deploys it with
one replica and a scaling policy, then offers an open-loop load through the gateway
(`/v2/.../infer` with an API key): the base rate, then ten times it, then the base rate
again until the auto-scaler is back at one replica. It reports the seconds from the
step to the first scale-up decision (the ScalingEvent's time) and to the first request
served by a new replica (from the replicas' completed counters in heartbeats, so up to
one heartbeat late), and the failed requests during the step and during the
scale-down. The same scenario then goes through the simulator (`manage.py simulate
--csv`), which writes the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import httpx
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
SIGNATURE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
             "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}
BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[0.5,-1,2,0.25]}]}'
NAME = "bench-step"
STABLE_WINDOW_S, PANIC_WINDOW_S, SCALE_DOWN_DELAY_S = 20.0, 2.0, 5.0


class StepModel(torch.nn.Module):
    """FP32 [-1, 4] -> [-1, 4] after `iterations` 256x256 tanh layers."""

    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.iterations = iterations
        self.up = torch.nn.Linear(4, 256)
        self.mix = torch.nn.Linear(256, 256)
        self.down = torch.nn.Linear(256, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x).repeat(16, 1)
        for _ in range(self.iterations):
            h = torch.tanh(self.mix(h))
        return self.down(h[: x.shape[0]])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Phase:
    """Outcomes of the requests sent during one phase of the load."""

    name: str
    sent: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def p50_ms(self) -> str:
        ordered = sorted(self.latencies_ms)
        return f"{ordered[len(ordered) // 2]:.1f}" if ordered else "-"


class OpenLoop:
    """Sends requests at a set rate whatever the answers take (open loop), in a thread."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.rate_per_s = 0.0
        self.phase = Phase("warm-up")
        self.phases = [self.phase]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def set(self, phase: str, rate_per_s: float) -> None:
        self.phase = Phase(phase)
        self.phases.append(self.phase)
        self.rate_per_s = rate_per_s

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            pending: set[asyncio.Task[None]] = set()
            next_s = time.monotonic()
            while not self._stop.is_set():
                if self.rate_per_s <= 0:
                    await asyncio.sleep(0.05)
                    next_s = time.monotonic()
                    continue
                next_s += 1.0 / self.rate_per_s
                await asyncio.sleep(max(0.0, next_s - time.monotonic()))
                task = asyncio.create_task(self._one(session, self.phase))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)

    async def _one(self, session: aiohttp.ClientSession, phase: Phase) -> None:
        phase.sent += 1
        started_s = time.monotonic()
        try:
            async with session.post(self.url, data=BODY,
                                    timeout=aiohttp.ClientTimeout(total=60)) as response:
                text = await response.text()
                if response.status == 200:
                    phase.ok += 1
                    phase.latencies_ms.append((time.monotonic() - started_s) * 1000)
                else:
                    phase.failed.append(f"{response.status} {text[:200]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            phase.failed.append(repr(exc))


def start_stack(var_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """Start the launcher (`make run`) on a fresh embedded default; return it and its env."""
    env = {**os.environ, "SWARM_VAR_DIR": str(var_dir), "SWARM_PORT": str(port),
           "HEARTBEAT_INTERVAL_S": "0.5",
           "LOCAL_FLEET_MAX_NODES": "1", "LOCAL_FLEET_BASE_PORT": str(20_000 + port % 1000 * 40),
           "LOG_LEVEL": "WARNING"}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    launcher = subprocess.Popen([sys.executable, "-m", "swarm_portal.launcher"], cwd=REPO_ROOT,
                                env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if launcher.poll() is not None:
            raise SystemExit(f"the launcher exited with {launcher.returncode}")
        time.sleep(0.2)
    from swarm_portal.launcher import embedded_environment

    os.environ.update(env)
    os.environ.update(embedded_environment())
    import django

    django.setup()
    return launcher, env


def deploy(tmp: Path, iterations: int, policy: dict[str, float]) -> tuple[int, str]:
    """Register the model, deploy it with a policy; return the deployment id and a key."""
    from django.contrib.auth import get_user_model

    from registry import services as registry
    from scaling import services as scaling
    from serving import services

    admin = get_user_model().objects.get(username="admin")
    path = tmp / "step.pt"
    torch.jit.save(torch.jit.script(StepModel(iterations).eval()), str(path))
    model = registry.do_create_model(name=NAME, description="bench", owner=admin)
    staging = registry.artifact_store().stage()
    staging.write(path.read_bytes())
    registry.do_create_version(model=model, staging=staging, signature=SIGNATURE, metadata={},
                               declared_format=None, user=admin)
    deployment = services.do_create_deployment(
        name=NAME, model=model, version_number=1, alias_name="", user=admin, replicas=1,
        max_batch_size=8, memory_bytes=256 * 1024**2)
    scaling.do_set_policy(deployment, **policy)
    _key, secret = services.do_create_api_key(name="bench", user=admin, deployments=None,
                                              expires_in=None, rate_limit_rps=None)
    return deployment.pk, secret


def ready_replicas(deployment_id: int) -> set[int]:
    from serving.models import Replica, ReplicaState

    return set(Replica.objects.filter(deployment_id=deployment_id, desired=True,
                                      state=ReplicaState.READY).values_list("pk", flat=True))


def completed_by_replica(deployment_id: int) -> dict[int, int]:
    """Return each replica's completed requests as its last heartbeat reported them."""
    from serving import live
    from serving.models import Node

    counts: dict[int, int] = {}
    figures = live.nodes_figures(list(Node.objects.values_list("pk", flat=True)))
    for node in figures.values():
        for status in node.get("replicas", []):
            counts[int(status["replica_id"])] = int(status.get("completed", 0))
    return counts


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise SystemExit(f"timed out waiting for {what}")


@dataclass
class StepResult:
    decision_s: float | None = None
    first_served_by_new_s: float | None = None
    max_replicas: int = 1
    scale_down_s: float | None = None
    events: list[str] = field(default_factory=list)


def watch_step(deployment_id: int, step_at_s: float, duration_s: float,
               first: set[int], result: StepResult) -> None:
    """Poll until the step ends: the first scale-up event, the first new replica's work."""
    from django.db.models import F

    from scaling.models import ScalingEvent, ScalingPolicy
    from serving.models import Deployment

    while time.time() - step_at_s < duration_s:
        if result.decision_s is None:
            event = ScalingEvent.objects.filter(
                deployment_id=deployment_id, to_replicas__gt=F("from_replicas"),
                created_at__gte=datetime.fromtimestamp(step_at_s, UTC),
            ).order_by("created_at").first()
            if event is not None:
                result.decision_s = event.created_at.timestamp() - step_at_s
                result.events.append(event.reason)
                samples = ScalingPolicy.objects.get(deployment_id=deployment_id).state["samples"]
                result.events.append("samples since the step (s, demand): " + ", ".join(
                    f"({t - step_at_s:.2f}, {d:.2f})" for t, d in samples if t > step_at_s - 3))
        if result.first_served_by_new_s is None:
            new = ready_replicas(deployment_id) - first
            counts = completed_by_replica(deployment_id)
            if any(counts.get(pk, 0) > 0 for pk in new):
                result.first_served_by_new_s = time.time() - step_at_s
        result.max_replicas = max(result.max_replicas,
                                  Deployment.objects.get(pk=deployment_id).replicas)
        time.sleep(0.1)


def back_to_one(deployment_id: int) -> bool:
    from serving.models import Deployment, Replica, ReplicaState

    draining = Replica.objects.filter(deployment_id=deployment_id, desired=False).exclude(
        state__in=[ReplicaState.STOPPED, ReplicaState.FAILED]).exists()
    return (Deployment.objects.get(pk=deployment_id).replicas == 1 and not draining
            and len(ready_replicas(deployment_id)) == 1)


def simulate(args: argparse.Namespace, tmp: Path, down_s: float, base_latency_s: float,
             cold_start_s: float) -> str:
    """Replay the same step through the simulator; return its report (and write the plot)."""
    trace = tmp / "step.csv"
    rows = [(0, args.base_rate), (args.base_s, args.base_rate * args.factor),
            (args.base_s + args.step_s, args.base_rate),
            (args.base_s + args.step_s + down_s, args.base_rate)]
    lines = ["timestamp_s,requests_per_s"]
    for (start, rate), (end, _) in itertools.pairwise(rows):
        lines += [f"{t},{rate}" for t in range(int(start), int(end))]
    trace.write_text("\n".join(lines) + "\n")
    # The same policy; the modelled replica takes the measured base latency and the
    # measured cold start (the simulator's fleet is otherwise its own: GPUs and prices).
    command = [sys.executable, "manage.py", "simulate", "--csv", str(trace), "--nodes", "4",
               "--target-in-flight", str(args.target_in_flight), "--min-replicas", "1",
               "--max-replicas", "4", "--stable-window-s", str(STABLE_WINDOW_S),
               "--panic-window-s", str(PANIC_WINDOW_S), "--scale-down-delay-s",
               str(SCALE_DOWN_DELAY_S), "--base-latency-s", f"{base_latency_s:.4f}",
               "--cold-start-s", f"{cold_start_s:.1f}", "--plot", args.plot]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "swarm_portal.settings"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          check=False)
    return done.stdout + done.stderr


def report(args: argparse.Namespace, load: OpenLoop, result: StepResult) -> None:
    print(f"\nbase {args.base_rate:g} req/s for {args.base_s:g} s, then "
          f"{args.base_rate * args.factor:g} req/s for {args.step_s:g} s, then "
          f"{args.base_rate:g} req/s until back at one replica")
    print("| phase | sent | ok | failed | p50 ms |\n|---|---|---|---|---|")
    for phase in load.phases[1:]:
        print(f"| {phase.name} | {phase.sent} | {phase.ok} | {len(phase.failed)} "
              f"| {phase.p50_ms()} |")
    print(f"\nstep -> first scale-up decision: {result.decision_s}")
    print(f"step -> first request served by a new replica: {result.first_served_by_new_s}")
    print(f"most replicas: {result.max_replicas}; back at one after the step: "
          f"{result.scale_down_s}")
    for line in result.events:
        print(f"  {line}")
    for phase in load.phases:
        for failure in phase.failed[:5]:
            print(f"  {phase.name} failure: {failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-rate", type=float, default=3.0, help="requests/s before")
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--base-s", type=float, default=15.0)
    parser.add_argument("--step-s", type=float, default=30.0)
    parser.add_argument("--iterations", type=int, default=200, help="model cost per request")
    parser.add_argument("--target-in-flight", type=float, default=0.05)
    parser.add_argument("--plot", default=str(REPO_ROOT / "docs" / "autoscale-sim.png"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="swarm-autoscale-"))
    port = free_port()
    launcher, _env = start_stack(tmp / "var", port)
    try:
        deployment_id, key = deploy(tmp, args.iterations, {
            "min_replicas": 1, "max_replicas": 4,
            "target_in_flight_per_replica": args.target_in_flight,
            "stable_window_s": STABLE_WINDOW_S, "panic_window_s": PANIC_WINDOW_S,
            "scale_down_delay_s": SCALE_DOWN_DELAY_S})
        first = wait_for(lambda: ready_replicas(deployment_id), 180, "the first replica")
        load = OpenLoop(f"http://127.0.0.1:{port}/v2/models/{NAME}/infer", key)
        load.set("base", args.base_rate)
        time.sleep(args.base_s)  # the base phase: load runs meanwhile
        step_at_s = time.time()
        load.set("step", args.base_rate * args.factor)
        result = StepResult()
        watch_step(deployment_id, step_at_s, args.step_s, first, result)
        load.set("scale-down", args.base_rate)
        down_at_s = time.time()
        wait_for(lambda: back_to_one(deployment_id), 300, "the scale-down", poll_s=0.5)
        result.scale_down_s = round(time.time() - down_at_s, 1)
        load.stop()
        report(args, load, result)
        cold_start_s = (result.first_served_by_new_s or 0) - (result.decision_s or 0)
        base_latency_s = float(load.phases[1].p50_ms()) / 1000
        print(simulate(args, tmp, result.scale_down_s, base_latency_s, cold_start_s))
    finally:
        launcher.send_signal(2)
        launcher.wait(timeout=120)


if __name__ == "__main__":
    main()
