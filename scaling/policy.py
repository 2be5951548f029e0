"""How many replicas a deployment should have (pure: no Django, the clock is passed in).

`decide(config, inputs, state)` takes this tick's figures and the state the previous
tick returned, and gives back the desired count, a human-readable reason and the new
state. The state is plain data (`to_dict`/`from_dict`), so the caller persists it and
a scheduler restart loses nothing; the Celery tick, the tests and the simulator all
call the same function.

Demand is concurrent requests: in flight plus queued on every replica, plus requests
the gateway holds while a deployment is at zero; or, under the "sequences" metric, a
generative replica's running plus waiting sequences (config.metric, the unit its reasons
name). Two windows average it: the stable
window decides normally; the short panic window catches bursts (scale up at once,
never down while in panic), as Knative's autoscaler does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from scaling.policy_config import (
    METRIC_IN_FLIGHT,
    METRIC_SEQUENCES,
    METRICS,
    ScalingPolicyConfig,
)
from scaling.policy_config import is_int as _is_int
from scaling.policy_config import is_number as _is_number

__all__ = ["METRICS", "METRIC_IN_FLIGHT", "METRIC_SEQUENCES", "Decision", "ReplicaSample",
           "ScalingInputs", "ScalingPolicyConfig", "ScalingState", "decide"]

# Bounds the ring if ticks come much faster than expected; at a 2 s tick and a
# 60 s window the ring holds 30 samples.
MAX_SAMPLES = 1024
STATE_VERSION = 1


@dataclass(frozen=True)
class ReplicaSample:
    """One replica's figures at this tick (floats so averaged reports fit too)."""

    in_flight: float
    queue_depth: float = 0.0
    # A generative replica's running + waiting sequences; None: it does not say (not
    # generative, or an older agent), and its requests in flight stand in for them.
    sequences: float | None = None

    def demand(self, metric: str) -> float:
        """Return this replica's demand in the metric's unit."""
        if metric == METRIC_SEQUENCES and self.sequences is not None:
            return self.sequences
        return self.in_flight + self.queue_depth


@dataclass(frozen=True)
class ScalingInputs:
    """What the auto-scaler sees at one tick."""

    now_s: float
    current_replicas: int  # ready + starting: the ones that count
    samples: Sequence[ReplicaSample] = ()
    held_requests: int = 0  # held by the gateway while the deployment is at zero

    @property
    def demand(self) -> float:
        """Return concurrent requests: in flight and queued on replicas, plus held ones."""
        return self.demand_for(METRIC_IN_FLIGHT)

    def demand_for(self, metric: str) -> float:
        """Return the replicas' demand in the metric's unit, plus the held requests (one
        held request becomes one sequence)."""
        return float(sum(s.demand(metric) for s in self.samples) + self.held_requests)


@dataclass(frozen=True)
class ScalingState:
    """What `decide` remembers between ticks; persist it with `to_dict`."""

    samples: tuple[tuple[float, float], ...] = ()  # (time_s, demand) within the stable window
    panic_since_s: float | None = None
    panic_last_over_s: float | None = None  # panic ends a stable window after this
    last_scale_up_s: float | None = None
    last_needed_s: float | None = None  # demand last needed the current count (no lower one)
    last_busy_s: float | None = None  # demand last non-zero, or first observation

    @property
    def in_panic(self) -> bool:
        """Return whether the deployment is in panic mode."""
        return self.panic_since_s is not None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable copy of this state."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["samples"] = [[t, d] for t, d in self.samples]
        data["version"] = STATE_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScalingState:
        """Return the state `to_dict` wrote; raise ValueError naming a bad field."""
        if data.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"version: unsupported scaling state version {data['version']!r}")
        times = {name: _optional_time(data, name) for name in _TIME_FIELDS}
        return cls(samples=_samples_from(data.get("samples", [])), **times)


_TIME_FIELDS = ("panic_since_s", "panic_last_over_s", "last_scale_up_s", "last_needed_s",
                "last_busy_s")


def _optional_time(data: Mapping[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is not None and not _is_number(value):
        raise ValueError(f"{name}: must be a number or null, got {value!r}")
    return None if value is None else float(value)


def _samples_from(raw: object) -> tuple[tuple[float, float], ...]:
    if not isinstance(raw, list | tuple):
        raise ValueError(f"samples: must be a list of [time_s, demand], got {raw!r}")
    samples = []
    for item in raw:
        if not (isinstance(item, list | tuple) and len(item) == 2
                and all(_is_number(v) for v in item)):
            raise ValueError(f"samples: bad entry {item!r}, want [time_s, demand]")
        samples.append((float(item[0]), float(item[1])))
    return tuple(samples)


@dataclass(frozen=True)
class Decision:
    """The desired replica count, why, and the state to pass to the next tick."""

    desired_replicas: int
    reason: str
    state: ScalingState
    panic: bool
    stable_demand: float = 0.0  # average concurrent requests over the stable window
    panic_demand: float = 0.0  # average concurrent requests over the panic window


@dataclass(frozen=True)
class _View:
    """Figures one decision is made from (internal)."""

    now_s: float
    current: int
    demand: float  # this tick's
    stable_demand: float
    panic_demand: float
    stable_desired: int
    panic_desired: int
    down_desired: int  # stable demand with the scale-down tolerance to spare


def decide(config: ScalingPolicyConfig, inputs: ScalingInputs,
           state: ScalingState) -> Decision:
    """Return the desired replica count for this tick, its reason and the next state."""
    _check_inputs(inputs)
    now_s, demand = float(inputs.now_s), inputs.demand_for(config.metric)
    samples = _record(state.samples, now_s, demand, config.stable_window_s)
    view = _view(config, inputs, demand, samples)
    state = _replace(
        state, samples=samples,
        # A fresh state starts both clocks now, so a new scheduler never scales down
        # or to zero on its first tick.
        last_needed_s=now_s if state.last_needed_s is None else state.last_needed_s,
        last_busy_s=now_s if demand > 0 or state.last_busy_s is None else state.last_busy_s,
    )
    state, panic_note = _update_panic(config, view, state)
    if _idle_to_zero(config, view, state):
        desired, reason = 0, _idle_reason(config, view, state)
    else:
        desired, reason = _raw_desired(config, view, state)
        desired, notes = _limit(config, view.current, desired)
        reason = "; ".join([panic_note + reason, *notes])
    reason = _finish_reason(reason, view.current, desired, state.in_panic)
    return Decision(desired, reason, _after(state, view, desired), state.in_panic,
                    view.stable_demand, view.panic_demand)


def _check_inputs(inputs: ScalingInputs) -> None:
    if not _is_number(inputs.now_s):
        raise ValueError(f"now_s: must be a finite number, got {inputs.now_s!r}")
    if not (_is_int(inputs.current_replicas) and inputs.current_replicas >= 0):
        raise ValueError(f"current_replicas: must be an integer >= 0, "
                         f"got {inputs.current_replicas!r}")
    if not (_is_int(inputs.held_requests) and inputs.held_requests >= 0):
        raise ValueError(f"held_requests: must be an integer >= 0, got {inputs.held_requests!r}")


def _record(samples: tuple[tuple[float, float], ...], now_s: float, demand: float,
            window_s: float) -> tuple[tuple[float, float], ...]:
    # Samples from "the future" mean the clock went back (a restart on another host):
    # drop them rather than let them sit in the window for ever.
    kept = [(t, d) for t, d in samples if now_s - window_s < t < now_s]
    kept.append((now_s, demand))
    return tuple(kept[-MAX_SAMPLES:])


def _average_since(samples: tuple[tuple[float, float], ...], since_s: float) -> float:
    recent = [d for t, d in samples if t > since_s]
    return sum(recent) / len(recent)


def _view(config: ScalingPolicyConfig, inputs: ScalingInputs, demand: float,
          samples: tuple[tuple[float, float], ...]) -> _View:
    now_s = float(inputs.now_s)
    stable = _average_since(samples, now_s - config.stable_window_s)
    panic = _average_since(samples, now_s - config.panic_window_s)
    target = config.target_per_replica
    spare_target = target * (1 - config.scale_down_tolerance)
    return _View(now_s, inputs.current_replicas, demand, stable, panic,
                 _replicas_for(stable, target), _replicas_for(panic, target),
                 _replicas_for(stable, spare_target))


def _replicas_for(demand: float, target: float) -> int:
    # Round before ceil so 16.000000001 / 8 does not ask for a third replica.
    return math.ceil(round(demand / target, 9))


def _capacity(config: ScalingPolicyConfig, current: int) -> float:
    # At zero replicas count one, as Knative does: a single held request at a cold
    # start is not a burst; a crowd of them is.
    return max(current, 1) * config.target_per_replica


def _update_panic(config: ScalingPolicyConfig, view: _View,
                  state: ScalingState) -> tuple[ScalingState, str]:
    over = view.panic_demand >= config.panic_threshold * _capacity(config, view.current)
    if over:
        since = view.now_s if state.panic_since_s is None else state.panic_since_s
        return _replace(state, panic_since_s=since, panic_last_over_s=view.now_s), ""
    last_over = state.panic_last_over_s
    if state.in_panic and last_over is not None \
            and view.now_s - last_over >= config.stable_window_s:
        note = (f"panic over ({_s(view.now_s - last_over)} s below "
                f"{config.panic_threshold:g}x capacity), ")
        return _replace(state, panic_since_s=None, panic_last_over_s=None), note
    return state, ""


def _replace(state: ScalingState, **changes: Any) -> ScalingState:
    data = {f.name: getattr(state, f.name) for f in fields(state)}
    data.update(changes)
    return ScalingState(**data)


def _idle_for_s(view: _View, state: ScalingState) -> float:
    return view.now_s - (view.now_s if state.last_busy_s is None else state.last_busy_s)


def _idle_to_zero(config: ScalingPolicyConfig, view: _View, state: ScalingState) -> bool:
    return (config.scale_to_zero and view.demand == 0 and not state.in_panic
            and _idle_for_s(view, state) >= config.idle_before_zero_s)


def _idle_reason(config: ScalingPolicyConfig, view: _View, state: ScalingState) -> str:
    # Zero skips the step limit: with no demand there is no capacity to protect.
    return (f"no demand for {_s(_idle_for_s(view, state))} s "
            f"(idle_before_zero {config.idle_before_zero_s:g} s)")


def _raw_desired(config: ScalingPolicyConfig, view: _View,
                 state: ScalingState) -> tuple[int, str]:
    if view.current == 0 and view.demand > 0:
        return _cold_start_desired(config, view)
    if state.in_panic:
        return _panic_desired(config, view)
    stable = (f"demand {view.stable_demand:.1f}{config.unit} over {config.stable_window_s:g} s"
              f" needs {view.stable_desired} at {config.target_per_replica:g}{config.unit} "
              "per replica")
    if view.stable_desired >= view.current:
        return view.stable_desired, stable
    spare = f"{view.down_desired} with {config.scale_down_tolerance:.0%} to spare"
    if view.down_desired >= view.current:
        return view.current, f"{stable}, {spare}"
    assert state.last_needed_s is not None  # decide() sets it before this is called
    below_for_s = view.now_s - state.last_needed_s
    if below_for_s >= config.scale_down_delay_s:
        return view.down_desired, f"{stable}, {spare}, below {view.current} for {_s(below_for_s)} s"
    wait_s = config.scale_down_delay_s - below_for_s
    return view.current, f"{stable}, {spare}, scale-down waits {_s(wait_s)} s more"


def _cold_start_desired(config: ScalingPolicyConfig, view: _View) -> tuple[int, str]:
    # The windows still hold the idle past; the requests waiting now are what counts.
    now_desired = _replicas_for(view.demand, config.target_per_replica)
    desired = max(now_desired, view.panic_desired, view.stable_desired)
    return desired, (f"{view.demand:g} held requests at zero need {now_desired} at "
                     f"{config.target_per_replica:g}{config.unit} per replica")


def _panic_desired(config: ScalingPolicyConfig, view: _View) -> tuple[int, str]:
    capacity = _capacity(config, view.current)
    desired = max(view.current, view.panic_desired, view.stable_desired)
    relation = ">=" if view.panic_demand >= config.panic_threshold * capacity else "<"
    text = (f"demand {view.panic_demand:.1f}{config.unit} over {config.panic_window_s:g} s "
            f"{relation} {config.panic_threshold:g}x capacity {capacity:g}{config.unit}")
    if view.panic_desired < view.current:
        text += f", needs {view.panic_desired} but no scale-down in panic"
    return desired, text


def _limit(config: ScalingPolicyConfig, current: int, desired: int) -> tuple[int, list[str]]:
    notes: list[str] = []
    desired = _step_limited(config, current, desired, notes)
    if desired < config.active_floor:
        notes.append(f"clamped to min {config.active_floor}")
        desired = config.active_floor
    if desired > config.max_replicas:
        notes.append(f"clamped to max {config.max_replicas}")
        desired = config.max_replicas
    return desired, notes


def _step_limited(config: ScalingPolicyConfig, current: int, desired: int,
                  notes: list[str]) -> int:
    up, down = config.max_step_up, config.max_step_down
    # The floor is a cold start: it may exceed one step, and a request is waiting.
    floor = config.active_floor if current == 0 else 0
    if up is not None and desired > max(current + up, floor):
        notes.append(f"limited by max_step_up {up}")
        return max(current + up, floor)
    if down is not None and desired < current - down:
        notes.append(f"limited by max_step_down {down}")
        return current - down
    return desired


def _finish_reason(reason: str, current: int, desired: int, panic: bool) -> str:
    if desired == current:
        return f"{'panic' if panic else 'no change'}: {reason}; stays {current}"
    if current == 0:
        action = "cold start"
    elif panic:
        action = "panic"
    elif desired == 0:
        action = "scale to zero"
    else:
        action = "scale up" if desired > current else "scale down"
    return f"{action}: {reason}; {current} -> {desired}"


def _after(state: ScalingState, view: _View, desired: int) -> ScalingState:
    if desired > view.current:
        return _replace(state, last_scale_up_s=view.now_s, last_needed_s=view.now_s)
    # Landing on exactly what demand needs restarts the delay for the next step down;
    # a step-limited drop does not, since demand is still below the new count.
    if view.down_desired >= desired or state.in_panic:
        return _replace(state, last_needed_s=view.now_s)
    return state


def _s(duration_s: float) -> str:
    """Return a measured duration for a reason: to 0.1 s, no trailing zeros ("30.2", "300")."""
    return f"{round(duration_s, 1):g}"
