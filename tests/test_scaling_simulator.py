"""Simulator, traces and fleet model (pure): cost, lateness, panic, CSV, plot, no Django."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scaling.fleet import GIB, Fleet, FleetModel, NodeType, default_fleet
from scaling.policy import ScalingPolicyConfig
from scaling.simulator import (
    builtin_trace,
    format_report,
    load_trace_csv,
    main,
    run_simulation,
    write_plot,
)
from scaling.traces import PATTERNS, Trace
from serving.placement import ReplicaNeed, place_replicas

CHEAP = NodeType("cheap", "NVIDIA L4", 24 * GIB, 1.0, 20.0)
PRICEY = NodeType("pricey", "NVIDIA A10G", 24 * GIB, 3.0, 25.0, gpus_per_node=2)
CONFIG = ScalingPolicyConfig(min_replicas=1, max_replicas=40, target_in_flight_per_replica=3.0)


def fleet(cheap: int = 10, pricey: int = 0, cold_start_s: float = 10.0) -> Fleet:
    groups = tuple((t, n) for t, n in ((CHEAP, cheap), (PRICEY, pricey)) if n)
    return Fleet(groups, replica_memory_bytes=20 * GIB, cold_start_s=cold_start_s)


def flat(rate_per_s: float, duration_s: float) -> Trace:
    return Trace((0.0,), (rate_per_s,), duration_s, name="flat")


@pytest.mark.parametrize(("low", "high"), [(20.0, 80.0), (50.0, 150.0)])
def test_more_load_needs_more_replicas_and_costs_more(low, high):
    results = [run_simulation(builtin_trace("steady", 900, seed=1, base_rate_per_s=rate),
                              fleet(cheap=20), CONFIG) for rate in (low, high)]
    assert results[1].peak_replicas > results[0].peak_replicas
    assert results[1].total_cost > results[0].total_cost
    assert all(r.late_requests == 0 for r in results)


@pytest.mark.parametrize(("replicas", "cheap", "pricey", "cost"), [
    (2, 10, 0, 2 * 1.0),  # 8 idle nodes cost nothing
    (3, 2, 5, 2 * 1.0 + 3.0),  # cheap nodes first, then one of the pricey ones
    (4, 0, 5, 4 * 3.0),  # spread: one replica per node before doubling up
])
def test_cost_counts_only_active_nodes(replicas, cheap, pricey, cost):
    config = replace(CONFIG, min_replicas=replicas, max_replicas=replicas)
    result = run_simulation(flat(10.0, 3600.0), fleet(cheap, pricey), config)
    assert result.total_cost == pytest.approx(cost)
    assert result.peak_active_nodes == replicas
    assert result.scale_event_count == 0


def test_the_burst_pattern_triggers_panic():
    trace = builtin_trace("burst", 1200, seed=3, base_rate_per_s=40.0)
    result = run_simulation(trace, fleet(cheap=40), CONFIG)
    assert result.panic_event_count >= 1
    panic = next(e for e in result.events if e.panic)
    assert panic.to_replicas > panic.from_replicas
    assert panic.reason.startswith("panic: ")
    assert result.peak_replicas > result.replicas[0]


def test_a_fleet_too_small_for_the_load_serves_late_and_reports_the_shortfall():
    result = run_simulation(flat(200.0, 300.0), fleet(cheap=3), CONFIG, target_latency_s=1.0)
    assert result.peak_replicas == 3
    assert result.placement_shortfalls > 0
    assert 0.5 < result.late_fraction <= 1.0


def test_scale_to_zero_and_a_cold_start_in_a_replay():
    times = (0.0, 100.0, 800.0)
    trace = Trace(times, (5.0, 0.0, 5.0), 900.0, name="gap")
    config = replace(CONFIG, min_replicas=0, scale_to_zero=True, idle_before_zero_s=300.0)
    result = run_simulation(trace, fleet(cold_start_s=20.0), config)
    reasons = [e.reason for e in result.events]
    assert any(r.startswith("scale to zero: ") for r in reasons)
    assert any(r.startswith("cold start: ") for r in reasons)
    assert result.late_requests > 0  # the cold start keeps them waiting 20 s


def test_a_replay_is_deterministic_for_a_seed():
    trace = builtin_trace("diurnal", 600, seed=5, base_rate_per_s=60.0)
    first, second = (run_simulation(trace, fleet(), CONFIG, seed=9) for _ in range(2))
    assert first == second
    assert "total cost" in format_report(first)


@pytest.mark.parametrize("name", PATTERNS)
def test_builtin_traces_are_seeded_and_non_negative(name):
    trace = builtin_trace(name, 3600, seed=2, base_rate_per_s=100.0)
    assert trace == builtin_trace(name, 3600, seed=2, base_rate_per_s=100.0)
    assert trace != builtin_trace(name, 3600, seed=3, base_rate_per_s=100.0)
    assert len(trace.rates_per_s) == 3600 and min(trace.rates_per_s) >= 0
    assert 50.0 < trace.mean_rate_per_s < 400.0


def test_an_unknown_pattern_is_refused():
    with pytest.raises(ValueError, match="unknown 'spiky'"):
        builtin_trace("spiky", 60, seed=0)


def test_a_csv_trace_loads_as_a_step_function(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("timestamp_s,requests_per_s\n0,10\n\n5,20.5\n10,0\n")
    trace = load_trace_csv(path)
    assert trace.times_s == (0.0, 5.0, 10.0)
    assert trace.duration_s == 15.0
    assert trace.rates_at(np.array([0.0, 4.9, 5.0, 12.0])).tolist() == [10.0, 10.0, 20.5, 0.0]


@pytest.mark.parametrize(("text", "message"), [
    ("", "no rows"),
    ("timestamp_s,requests_per_s\n", "no rows"),
    ("0,10\n1,ten\n", "line 2: requests_per_s 'ten' is not a number"),
    ("0,10\n1\n", "line 2: want 2 columns"),
    ("0,10,3\n", "line 1: want 2 columns"),
    ("0,10\n1,-4\n", "line 2: values must be >= 0"),
    ("0,10\n5,1\n5,2\n", "line 3: timestamp_s 5 is not after 5"),
    ("0,inf\n", "line 1: requests_per_s 'inf' is not finite"),
    ("time,rate\n0,1\n", "line 1: timestamp_s 'time' is not a number"),
])
def test_a_bad_csv_row_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_trace_csv(path)


def test_the_plot_is_a_png(tmp_path):
    result = run_simulation(builtin_trace("burst", 900, seed=1, base_rate_per_s=30.0),
                            fleet(cheap=30), CONFIG)
    path = tmp_path / "sim.png"
    write_plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_prints_the_report(tmp_path, capsys):
    plot = tmp_path / "out.png"
    assert main(["--pattern", "burst", "--nodes", "20", "--duration-s", "600",
                 "--plot", str(plot)]) == 0
    output = capsys.readouterr().out
    assert "total cost:" in output and "scale events:" in output
    assert plot.exists()


def test_the_fleet_places_exactly_as_placement_does_on_every_node():
    model = FleetModel(fleet(cheap=7, pricey=6))
    need = ReplicaNeed(20 * GIB, "gpu", "model")
    rng = random.Random(4)
    for _ in range(30):
        if rng.random() < 0.6:
            count = rng.randint(1, 6)
            expected = place_replicas(model.node_views(), need, count)
            model.add(count, 0.0)
            placed = model.replica_locations()[-len(expected):] if expected else []
            assert placed == [(p.node_id, p.gpu_index) for p in expected]
        else:
            model.remove(rng.randint(1, 4), 0.0)
    assert model.replica_count <= fleet(cheap=7, pricey=6).replica_slots


def test_the_default_fleet_has_the_requested_nodes():
    big = default_fleet(1000)
    assert big.node_count == 1000
    assert big.replica_slots > 1000


def test_the_pure_modules_import_no_django():
    code = ("import sys, scaling.policy, scaling.simulator, scaling.traces, scaling.fleet; "
            "print(sorted(m for m in ('django', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"


def test_manage_simulate_writes_a_report_and_a_plot(tmp_path, capsys):
    from django.core.management import call_command

    plot = tmp_path / "sim.png"
    call_command("simulate", "--pattern", "burst", "--nodes", "20", "--duration-s", "600",
                 "--plot", str(plot))
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "scale events" in capsys.readouterr().out
