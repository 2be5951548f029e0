"""Scaling policy (pure): panic, steadiness, scale-down delay, zero, bounds, steps, restarts."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling.policy import (
    Decision,
    ReplicaSample,
    ScalingInputs,
    ScalingPolicyConfig,
    ScalingState,
    decide,
)

TICK_S = 2.0
CONFIG = ScalingPolicyConfig(min_replicas=1, max_replicas=50, target_in_flight_per_replica=8.0)


@dataclass(frozen=True)
class Tick:
    time_s: float
    before: int
    decision: Decision

    @property
    def after(self) -> int:
        return self.decision.desired_replicas


def drive(config: ScalingPolicyConfig, demands: Sequence[float], *, replicas: int,
          start_s: float = 0.0, state: ScalingState | None = None,
          between: Callable[[ScalingState], ScalingState] = lambda s: s,
          tick_s: float = TICK_S) -> list[Tick]:
    """Feed one demand per tick; replicas follow each decision at once."""
    state = state or ScalingState()
    ticks = []
    for index, demand in enumerate(demands):
        now_s = start_s + index * tick_s
        # At zero replicas the gateway holds what arrives.
        samples = (ReplicaSample(demand, 0.0),) if replicas else ()
        held = 0 if replicas else math.ceil(demand)
        decision = decide(config, ScalingInputs(now_s, replicas, samples, held), state)
        ticks.append(Tick(now_s, replicas, decision))
        state, replicas = between(decision.state), decision.desired_replicas
    return ticks


def changes(ticks: list[Tick]) -> list[Tick]:
    return [t for t in ticks if t.after != t.before]


def seconds(duration_s: float) -> int:
    return int(duration_s / TICK_S)


def test_the_reason_names_the_inputs_of_a_panic():
    state = ScalingState(samples=((96.0, 48.0), (98.0, 48.0)), last_needed_s=0.0)
    decision = decide(CONFIG, ScalingInputs(100.0, 2, (ReplicaSample(40.0, 8.0),)), state)
    assert decision.reason == "panic: demand 48.0 over 6 s >= 2x capacity 16; 2 -> 6"
    assert decision.panic


@pytest.mark.parametrize("burst", [40.0, 80.0, 300.0])
def test_a_burst_scales_up_at_once_and_never_down_during_panic(burst):
    calm, spike, lull = seconds(120), seconds(10), seconds(40)
    ticks = drive(CONFIG, [8.0] * calm + [burst] * spike + [0.0] * lull, replicas=1)
    first = ticks[calm]
    assert first.decision.panic
    assert first.after > first.before
    assert first.decision.reason.startswith("panic: ")
    in_panic = [t for t in ticks[calm:] if t.decision.panic]
    assert len(in_panic) == spike + lull  # the lull is shorter than the stable window
    assert all(t.after >= t.before for t in in_panic)
    assert max(t.after for t in ticks) >= min(CONFIG.max_replicas, math.ceil(burst / 8))


def test_panic_ends_a_stable_window_after_the_burst_and_then_scales_down():
    ticks = drive(CONFIG, [6.0] * seconds(60) + [80.0] * seconds(10) + [6.0] * seconds(300),
                  replicas=1)
    last_panic = max(t.time_s for t in ticks if t.decision.panic)
    first_calm = next(t for t in ticks if t.time_s > last_panic)
    assert first_calm.decision.reason.startswith("no change: panic over")
    downs = [t for t in changes(ticks) if t.after < t.before]
    assert downs and downs[0].time_s >= last_panic + CONFIG.scale_down_delay_s
    assert ticks[-1].after == 1


@pytest.mark.parametrize("level", [8.0, 20.0, 37.0, 40.0, 63.0])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_steady_noisy_load_does_not_flap(level, seed):
    rng = random.Random(seed)
    demands = [level * rng.uniform(0.85, 1.15) for _ in range(seconds(1800))]
    ticks = drive(CONFIG, demands, replicas=math.ceil(level / 8))
    assert len(changes(ticks)) <= 1
    assert not any(t.decision.panic for t in ticks)


@pytest.mark.parametrize("delay_s", [10.0, 30.0, 90.0])
def test_a_slow_decline_waits_the_delay_before_each_step_down(delay_s):
    config = replace(CONFIG, scale_down_delay_s=delay_s)
    demands = [80.0 - 72.0 * i / seconds(600) for i in range(seconds(600))] + [8.0] * 200
    ticks = drive(config, demands, replicas=10)
    downs = [t for t in changes(ticks) if t.after < t.before]
    assert len(downs) >= 2
    gaps = [b.time_s - a.time_s for a, b in zip([ticks[0], *downs], downs, strict=False)]
    assert min(gaps) >= delay_s
    assert all(t.after <= t.before for t in ticks)
    assert ticks[-1].after == 2  # 8 in flight with 10% to spare at 8 per replica
    assert any("scale-down waits" in t.decision.reason for t in ticks)


def test_a_drop_below_the_spare_band_is_needed_before_scaling_down():
    ticks = drive(CONFIG, [39.0] * seconds(600), replicas=6)
    assert ticks[-1].after == 6  # 39 fits 5 at 8, but not with 10% to spare
    assert "6 with 10% to spare" in ticks[-1].decision.reason


ZERO = replace(CONFIG, min_replicas=0, scale_to_zero=True, idle_before_zero_s=300.0)


@pytest.mark.parametrize(("config", "final"), [
    (ZERO, 0),
    (replace(ZERO, min_replicas=2), 0),
    (CONFIG, 1),
    (replace(CONFIG, min_replicas=2), 2),
])
def test_idle_goes_to_zero_only_when_opted_in(config, final):
    ticks = drive(config, [0.0] * seconds(400), replicas=config.active_floor)
    assert ticks[-1].after == final
    zero = [t for t in ticks if t.after == 0]
    assert all(t.time_s >= 300.0 for t in zero)
    if final == 0:
        assert zero[0].time_s == 300.0
        assert zero[0].decision.reason.startswith("scale to zero: no demand for 300 s")


def test_any_demand_restarts_the_idle_clock():
    ticks = drive(ZERO, [0.0] * seconds(250) + [1.0] + [0.0] * seconds(280), replicas=1)
    assert all(t.after == 1 for t in ticks)


@pytest.mark.parametrize(("config", "held", "expected"), [
    (ZERO, 1, 1),
    (replace(ZERO, min_replicas=3, max_step_up=1), 1, 3),
    (ZERO, 30, 4),
    (replace(ZERO, max_replicas=2), 30, 2),
])
def test_a_held_request_at_zero_starts_replicas_at_once(config, held, expected):
    idle = drive(config, [0.0] * seconds(400), replicas=1)
    assert idle[-1].after == 0
    inputs = ScalingInputs(800.0, 0, (), held_requests=held)
    decision = decide(config, inputs, idle[-1].decision.state)
    assert decision.desired_replicas == expected
    assert decision.reason.startswith(f"cold start: {held} held requests at zero")


def test_zero_stays_zero_without_held_requests():
    ticks = drive(ZERO, [0.0] * seconds(600), replicas=1)
    assert ticks[-1].decision.reason.startswith("no change: no demand for")
    assert ticks[-1].after == 0


@pytest.mark.parametrize(("replicas", "demand", "expected", "note"), [
    (5, 1000.0, 20, "clamped to max 20"),
    (30, 80.0, 20, "clamped to max 20"),  # a lowered max applies at once
    (1, 0.0, 3, "clamped to min 3"),
])
def test_bounds_clamp_the_count(replicas, demand, expected, note):
    config = replace(CONFIG, min_replicas=3, max_replicas=20)
    ticks = drive(config, [demand] * 3, replicas=replicas)
    assert ticks[0].after == expected
    assert note in ticks[0].decision.reason


def test_step_limits_bound_each_decision():
    config = replace(CONFIG, max_step_up=2, max_step_down=1, scale_down_delay_s=0.0)
    ups = drive(config, [200.0] * 10, replicas=1)
    assert [t.after for t in ups[:4]] == [3, 5, 7, 9]
    assert "limited by max_step_up 2" in ups[0].decision.reason
    downs = drive(config, [0.0] * seconds(200), replicas=25)
    steps = [t.before - t.after for t in changes(downs)]
    assert steps and set(steps) == {1}
    assert downs[-1].after == 1


def test_a_restart_with_persisted_state_decides_the_same():
    rng = random.Random(7)
    demands = ([8.0] * seconds(100) + [90.0] * seconds(20)
               + [rng.uniform(0, 30) for _ in range(seconds(200))] + [0.0] * seconds(400))

    def restart(state: ScalingState) -> ScalingState:
        return ScalingState.from_dict(json.loads(json.dumps(state.to_dict())))

    config = replace(ZERO, max_step_down=2)
    straight = drive(config, demands, replicas=1)
    restarted = drive(config, demands, replicas=1, between=restart)
    assert [t.decision for t in restarted] == [t.decision for t in straight]
    assert len(changes(straight)) > 3


def test_a_fresh_state_never_scales_down_or_to_zero_on_its_first_tick():
    decision = decide(ZERO, ScalingInputs(1000.0, 6, (ReplicaSample(0.0),)), ScalingState())
    assert decision.desired_replicas == 6
    assert "scale-down waits 30 s more" in decision.reason


def test_every_decision_has_a_reason_naming_its_inputs():
    demands = [8.0] * seconds(60) + [80.0] * seconds(10) + [0.0] * seconds(500) + [5.0] * 5
    ticks = drive(ZERO, demands, replicas=1)
    prefixes = ("panic: ", "scale up: ", "scale down: ", "scale to zero: ", "cold start: ",
                "no change: ")
    assert all(t.decision.reason.startswith(prefixes) for t in ticks)
    assert all(("demand" in t.decision.reason or "held" in t.decision.reason) for t in ticks)
    seen = {t.decision.reason.split(":")[0] for t in ticks}
    assert seen >= {"panic", "scale down", "scale to zero", "cold start", "no change"}


def test_demand_sums_in_flight_queue_and_held_requests():
    inputs = ScalingInputs(0.0, 2, (ReplicaSample(3, 1), ReplicaSample(2.5, 0)), held_requests=2)
    assert inputs.demand == 8.5


@pytest.mark.parametrize(("changes_", "field"), [
    ({"min_replicas": 0}, "min_replicas"),
    ({"min_replicas": -1, "scale_to_zero": True}, "min_replicas"),
    ({"min_replicas": 1.5}, "min_replicas"),
    ({"max_replicas": 0}, "max_replicas"),
    ({"min_replicas": 5, "max_replicas": 4}, "max_replicas"),
    ({"target_in_flight_per_replica": 0}, "target_in_flight_per_replica"),
    ({"target_in_flight_per_replica": math.nan}, "target_in_flight_per_replica"),
    ({"panic_window_s": 120.0}, "panic_window_s"),
    ({"panic_threshold": 0.5}, "panic_threshold"),
    ({"scale_down_delay_s": -1.0}, "scale_down_delay_s"),
    ({"max_step_up": 0}, "max_step_up"),
    ({"max_step_down": True}, "max_step_down"),
    ({"scale_to_zero": "yes"}, "scale_to_zero"),
    ({"idle_before_zero_s": -5.0}, "idle_before_zero_s"),
])
def test_a_bad_config_names_the_field(changes_, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        replace(CONFIG, **changes_)


@pytest.mark.parametrize(("data", "field"), [
    ({"samples": "nope"}, "samples"),
    ({"samples": [[1.0]]}, "samples"),
    ({"panic_since_s": "soon"}, "panic_since_s"),
    ({"version": 99}, "version"),
])
def test_bad_persisted_state_names_the_field(data, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        ScalingState.from_dict(data)


def test_a_clock_that_goes_back_drops_future_samples():
    ticks = drive(CONFIG, [16.0] * 20, replicas=2, start_s=1000.0)
    decision = decide(CONFIG, ScalingInputs(10.0, 2, (ReplicaSample(16.0),)),
                      ticks[-1].decision.state)
    assert decision.state.samples == ((10.0, 16.0),)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 500), st.integers(0, 3)), min_size=1, max_size=60),
       st.booleans(), st.integers(1, 4))
def test_decisions_stay_within_bounds(steps, to_zero, step_up):
    config = ScalingPolicyConfig(min_replicas=0 if to_zero else 2, max_replicas=12,
                                 target_in_flight_per_replica=4.0, scale_to_zero=to_zero,
                                 idle_before_zero_s=20.0, max_step_up=step_up)
    state, replicas = ScalingState(), 3
    for index, (demand, held) in enumerate(steps):
        samples = (ReplicaSample(demand),) if replicas else ()
        inputs = ScalingInputs(index * TICK_S, replicas, samples, held if not replicas else 0)
        decision = decide(config, inputs, state)
        low = 0 if to_zero else config.min_replicas
        assert low <= decision.desired_replicas <= config.max_replicas
        if decision.panic:
            assert decision.desired_replicas >= min(replicas, config.max_replicas)
        if replicas == 0 and held:
            assert decision.desired_replicas >= 1
        state, replicas = decision.state, decision.desired_replicas


def test_measured_durations_in_reasons_are_given_to_a_tenth_of_a_second():
    # ticks 0.317 s apart: the durations measured between them are not round numbers
    demands = [80.0 - 72.0 * i / seconds(600) for i in range(seconds(600))] + [8.0] * 200
    ticks = drive(CONFIG, demands, replicas=10, tick_s=0.317)
    durations = [float(number) for t in ticks
                 for number in re.findall(r"(?:for|waits|over \() ?([\d.]+) s", t.decision.reason)]
    assert durations, "no reason gave a measured duration"
    assert all(round(d, 1) == d for d in durations)
