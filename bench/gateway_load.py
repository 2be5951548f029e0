"""The load side of bench/gateway.py (also used by bench/tunnel.py and bench/node_tls.py):
the targets, one cell's figures, CPU read from /proc, and the wrk load generator (one
C process, a Lua hook counting answers that are not 200).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

INFER_PATH = "/v2/models/mlp/infer"
# wrk: the request, a count of answers that are not 200, and one result line from done().
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
%(headers)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) not_ok = 0 end
function response(status, headers, body) if status ~= 200 then not_ok = not_ok + 1 end end
function done(summary, latency, requests)
  local not_ok_total = 0
  for _, thread in ipairs(threads) do not_ok_total = not_ok_total + thread:get("not_ok") end
  local e = summary.errors
  io.write(string.format("WRK_RESULT %%d %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99), not_ok_total,
    e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]


@dataclass
class Cell:
    target: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    percentiles_ms: dict[float, float]  # 0.5 -> p50, 0.99 -> p99
    cpu_s: dict[str, float]  # process name -> CPU seconds used during the cell ("client" too)

    def cpu_us_per_request(self, process: str) -> float:
        return self.cpu_s[process] / self.requests * 1e6

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    def latency_ms(self, fraction: float) -> float:
        return self.percentiles_ms[fraction]


def percentiles(latencies_ms: list[float]) -> dict[float, float]:
    ordered = sorted(latencies_ms) or [float("nan")]
    return {f: ordered[min(len(ordered) - 1, int(f * len(ordered)))] for f in (0.5, 0.99)}


def cpu_s(pid: int) -> float:
    """Return the CPU time (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_script(target: Target, body: bytes, scripts: Path) -> Path:
    """Write (once per target) the Lua script that makes wrk send our request."""
    path = scripts / f"{target.name}.lua"
    if not path.exists():
        headers = "\n".join(f'wrk.headers["{name}"] = "{value}"'
                            for name, value in target.headers.items())
        path.write_text(WRK_SCRIPT % {"body": body.decode(), "headers": headers})
    return path


def run_wrk(target: Target, concurrency: int, duration_s: float, threads: int,
            script: Path) -> tuple[list[int], float]:
    """Run wrk once; return its WRK_RESULT figures and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    threads = max(1, min(threads, concurrency))  # wrk needs a connection per thread
    done = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
         "--timeout", "10s", "-s", str(script), f"{target.url}{INFER_PATH}"],
        capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"^WRK_RESULT ([\d ]+)$", done.stdout, re.MULTILINE)
    if match is None:
        raise SystemExit(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")
    used_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return [int(field) for field in match.group(1).split()], used_s


def drive_wrk(target: Target, concurrency: int, args: argparse.Namespace, body: bytes,
              pids: dict[str, int], scripts: Path) -> Cell:
    """One cell with wrk: a warm-up run, then the measured run with CPU read around it."""
    script = wrk_script(target, body, scripts)
    if args.warm_up_s > 0:
        run_wrk(target, concurrency, args.warm_up_s, args.wrk_threads, script)
    cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
    (requests, duration_us, p50_us, p99_us, not_ok, failed), client_s = run_wrk(
        target, concurrency, args.duration_s, args.wrk_threads, script)
    used = {name: cpu_s(pid) - cpu_before[name] for name, pid in pids.items()}
    used["client"] = client_s
    return Cell(target.name, concurrency, requests, not_ok + failed, duration_us / 1e6,
                {0.5: p50_us / 1000.0, 0.99: p99_us / 1000.0}, used)
