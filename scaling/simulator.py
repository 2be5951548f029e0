"""Replay a load trace through the scaling policy and placement (pure: no Django).

Each tick (1 s by default) requests arrive (Poisson around the trace's rate), the
ready replicas serve up to their capacity and the rest waits in one shared backlog;
every `decide_every_s` the policy sees the fleet's figures and the model adds or
removes replicas through `serving.placement`. New replicas serve after the fleet's
cold start; a node with no replica costs nothing.

    python -m scaling.simulator --pattern burst --nodes 1000 --duration-s 86400 --plot out.png
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from scaling.fleet import Fleet, FleetModel, default_fleet
from scaling.plot import write_plot
from scaling.policy import (
    Decision,
    ReplicaSample,
    ScalingInputs,
    ScalingPolicyConfig,
    ScalingState,
    decide,
)
from scaling.traces import PATTERNS, Trace, builtin_trace, load_trace_csv

__all__ = ["ScaleEvent", "SimulationResult", "builtin_trace", "format_report",
           "load_trace_csv", "main", "run_simulation", "write_plot"]


@dataclass(frozen=True)
class ScaleEvent:
    """A change in the replica count and the policy's reason for it."""

    time_s: float
    from_replicas: int
    to_replicas: int
    reason: str
    panic: bool


@dataclass(frozen=True)
class SimulationResult:
    """What a replay cost and how it served, with per-tick series for the plot."""

    trace_name: str
    tick_s: float
    target_latency_s: float
    total_cost: float  # in the currency of the node prices
    total_requests: int
    late_requests: int  # waited longer than target_latency_s
    peak_replicas: int
    peak_active_nodes: int
    placement_shortfalls: int  # decisions that wanted more replicas than fitted
    events: tuple[ScaleEvent, ...]
    load_per_s: tuple[float, ...] = field(repr=False)
    replicas: tuple[int, ...] = field(repr=False)
    latency_s: tuple[float, ...] = field(repr=False)

    @property
    def late_fraction(self) -> float:
        """Return the share of requests that waited longer than the target."""
        return self.late_requests / self.total_requests if self.total_requests else 0.0

    @property
    def scale_event_count(self) -> int:
        """Return how many times the replica count changed."""
        return len(self.events)

    @property
    def panic_event_count(self) -> int:
        """Return how many scale events happened in panic mode."""
        return sum(event.panic for event in self.events)

    @property
    def duration_s(self) -> float:
        """Return the simulated time."""
        return len(self.load_per_s) * self.tick_s


@dataclass
class _Run:
    """Mutable state of one replay (internal)."""

    model: FleetModel
    config: ScalingPolicyConfig
    policy_state: ScalingState = field(default_factory=ScalingState)
    backlog: float = 0.0  # requests waiting for a replica
    in_flight: float = 0.0  # requests being served, by Little's law
    cost: float = 0.0
    late: int = 0
    shortfalls: int = 0
    events: list[ScaleEvent] = field(default_factory=list)


def run_simulation(trace: Trace, fleet: Fleet, config: ScalingPolicyConfig, *,
                   tick_s: float = 1.0, target_latency_s: float = 1.0, seed: int = 0,
                   decide_every_s: float = 2.0,
                   initial_replicas: int | None = None) -> SimulationResult:
    """Return cost, lateness and scale events of replaying `trace` on `fleet`."""
    _check_run_args(tick_s, target_latency_s, decide_every_s)
    ticks = math.ceil(trace.duration_s / tick_s)
    rates = trace.rates_at(np.arange(ticks) * tick_s)
    arrivals: list[int] = np.random.default_rng(seed).poisson(rates * tick_s).tolist()
    run = _Run(FleetModel(fleet), config)
    if initial_replicas is None:
        initial_replicas = _warm_start_replicas(float(rates[0]) if ticks else 0.0, fleet, config)
    # Start warm, as a long-running deployment would be: these serve from the first tick.
    run.model.add(initial_replicas, -fleet.cold_start_s)
    load: list[float] = []
    replicas: list[int] = []
    latency: list[float] = []
    decide_every_ticks = max(1, round(decide_every_s / tick_s))
    for tick, arrived in enumerate(arrivals):
        now_s = tick * tick_s
        latency_s = _serve(run, arrived, now_s, tick_s)
        if latency_s > target_latency_s:
            run.late += arrived
        if tick % decide_every_ticks == 0:
            _apply(run, decide(config, _inputs(run, now_s), run.policy_state), now_s)
        load.append(arrived / tick_s)
        replicas.append(run.model.replica_count)
        latency.append(latency_s)
    return SimulationResult(
        trace.name, tick_s, target_latency_s, run.cost, sum(arrivals), run.late,
        max(replicas, default=0), run.model.peak_active_nodes, run.shortfalls,
        tuple(run.events), tuple(load), tuple(replicas), tuple(latency))


def _warm_start_replicas(rate_per_s: float, fleet: Fleet, config: ScalingPolicyConfig) -> int:
    in_flight = rate_per_s * fleet.base_latency_s  # Little's law
    needed = math.ceil(in_flight / config.target_in_flight_per_replica)
    return min(max(needed, config.active_floor), config.max_replicas)


def _check_run_args(tick_s: float, target_latency_s: float, decide_every_s: float) -> None:
    for name, value in (("tick_s", tick_s), ("target_latency_s", target_latency_s),
                        ("decide_every_s", decide_every_s)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: must be a positive number, got {value!r}")


def _serve(run: _Run, arrived: int, now_s: float, tick_s: float) -> float:
    """Serve one tick; return the latency estimate for requests arriving in it."""
    model = run.model
    model.promote_ready(now_s)
    # A node is paid for from placement, cold start included.
    run.cost += model.active_price_per_hour * tick_s / 3600.0
    run.backlog += arrived
    served = min(run.backlog, model.ready_rate_per_s * tick_s)
    run.backlog -= served
    base_s = model.fleet.base_latency_s
    run.in_flight = served / tick_s * base_s
    if run.backlog <= 0:
        return base_s
    if model.ready_rate_per_s <= 0:
        return math.inf  # held until a replica is ready
    return base_s + run.backlog / model.ready_rate_per_s


def _inputs(run: _Run, now_s: float) -> ScalingInputs:
    model = run.model
    if model.ready_count == 0:
        # No replica serves yet: the gateway holds the backlog.
        return ScalingInputs(now_s, model.replica_count, (), math.ceil(run.backlog))
    # The model keeps one shared queue, so it reports one aggregate sample; the
    # policy only sums samples, so this equals an even split over the replicas.
    return ScalingInputs(now_s, model.replica_count,
                         (ReplicaSample(run.in_flight, run.backlog),))


def _apply(run: _Run, decision: Decision, now_s: float) -> None:
    run.policy_state = decision.state
    model = run.model
    before, wanted = model.replica_count, decision.desired_replicas
    if wanted > before:
        placed = model.add(wanted - before, now_s)
        if placed < wanted - before:
            run.shortfalls += 1
    elif wanted < before:
        model.remove(before - wanted, run.in_flight / max(1, model.ready_count))
    after = model.replica_count
    if after != before:
        note = "" if after == wanted else f" (only {after - before} fitted)"
        run.events.append(ScaleEvent(now_s, before, after, decision.reason + note,
                                     decision.panic))


def format_report(result: SimulationResult) -> str:
    """Return a human-readable summary of a replay."""
    lines = [
        f"trace {result.trace_name}: {result.duration_s:g} s at {result.tick_s:g} s ticks",
        f"total cost: {result.total_cost:.2f}",
        f"requests: {result.total_requests}, over {result.target_latency_s:g} s: "
        f"{result.late_requests} ({result.late_fraction:.2%})",
        f"scale events: {result.scale_event_count} ({result.panic_event_count} in panic)",
        f"peak replicas: {result.peak_replicas}, peak active nodes: {result.peak_active_nodes}",
        f"placement shortfalls: {result.placement_shortfalls}",
    ]
    return "\n".join(lines)


def _format_events(events: Sequence[ScaleEvent], limit: int) -> list[str]:
    shown = [f"  t={e.time_s:>8g} s  {e.from_replicas:>5} -> {e.to_replicas:<5} {e.reason}"
             for e in events[:limit]]
    if len(events) > limit:
        shown.append(f"  ... and {len(events) - limit} more")
    return shown


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scaling.simulator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options (shared by this CLI and `manage.py simulate`)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--pattern", choices=PATTERNS, default="burst")
    source.add_argument("--csv", help="trace file with timestamp_s,requests_per_s rows")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--duration-s", type=int, default=3600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-rate-per-s", type=float,
                        help="pattern base rate (default: 12%% of the fleet's capacity)")
    parser.add_argument("--target-in-flight", type=float,
                        help="per replica (default: 70%% of the slowest replica's concurrency)")
    parser.add_argument("--target-latency-s", type=float, default=1.0)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, help="default: every slot in the fleet")
    parser.add_argument("--scale-to-zero", action="store_true")
    parser.add_argument("--stable-window-s", type=float, default=60.0)
    parser.add_argument("--panic-window-s", type=float, default=6.0)
    parser.add_argument("--scale-down-delay-s", type=float, default=30.0)
    parser.add_argument("--base-latency-s", type=float, default=0.2,
                        help="service time of one request with no queue")
    parser.add_argument("--cold-start-s", type=float, default=30.0,
                        help="from placement until a new replica serves")
    parser.add_argument("--events", type=int, default=20, help="scale events to print")
    parser.add_argument("--plot", help="write a PNG of load, replicas and latency here")


def _or_default(value: float | None, default: float) -> float:
    return default if value is None else value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator CLI; print the report and the time it took."""
    return run_cli(_parser().parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    """Run a simulation described by parsed options; print the report."""
    fleet = dataclasses.replace(default_fleet(args.nodes), base_latency_s=args.base_latency_s,
                                cold_start_s=args.cold_start_s)
    saturated_in_flight = fleet.slowest_rate_per_s * fleet.base_latency_s
    config = ScalingPolicyConfig(
        min_replicas=args.min_replicas,
        max_replicas=fleet.replica_slots if args.max_replicas is None else args.max_replicas,
        target_in_flight_per_replica=_or_default(args.target_in_flight,
                                                 0.7 * saturated_in_flight),
        scale_to_zero=args.scale_to_zero, stable_window_s=args.stable_window_s,
        panic_window_s=args.panic_window_s, scale_down_delay_s=args.scale_down_delay_s)
    if args.csv:
        trace = load_trace_csv(args.csv)
    else:
        base_rate = _or_default(args.base_rate_per_s,
                                0.12 * fleet.replica_slots * fleet.slowest_rate_per_s)
        trace = builtin_trace(args.pattern, args.duration_s, args.seed, base_rate_per_s=base_rate)
    started = time.perf_counter()
    result = run_simulation(trace, fleet, config, target_latency_s=args.target_latency_s,
                            seed=args.seed)
    took_s = time.perf_counter() - started
    print(format_report(result))
    print("\n".join(_format_events(result.events, args.events)))
    print(f"fleet: {fleet.node_count} nodes, {fleet.replica_slots} replica slots; "
          f"simulated in {took_s:.1f} s")
    if args.plot:
        write_plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
