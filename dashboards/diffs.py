"""What changed between two deployment revisions, in words (pure: no Django)."""

from __future__ import annotations

from typing import Any

NONE = "\u2013"  # an en dash
TIMES = "\u00d7"  # a multiplication sign

# Spec field -> how the page names it (fields not listed keep their own name).
LABELS = {"replicas": "replicas", "version": "version", "traffic": "canary split",
          "alias_name": "alias", "memory_bytes": "memory", "max_batch_size": "max batch",
          "max_queue_delay_ms": "queue delay ms", "max_in_flight_per_replica":
          "max in flight", "request_timeout_s": "timeout s",
          "prefix_affinity_chars": "prefix affinity chars"}


def split_text(traffic: dict[str, float] | None) -> str:
    """Return a canary split as effective percentages, e.g. "v1 90% · v2 10%"."""
    weights = {str(v): float(w) for v, w in (traffic or {}).items() if float(w) > 0}
    total = sum(weights.values())
    if not total:
        return "none"
    return " · ".join(f"v{v} {100 * w / total:.3g}%" for v, w in
                      sorted(weights.items(), key=lambda item: int(item[0])))


def _value(name: str, value: Any) -> str:
    if name == "traffic":
        return split_text(value)
    if name == "version":
        return f"v{value}"
    if name == "memory_bytes" and isinstance(value, int):
        return f"{value / 1024**3:.3g} GiB"
    return NONE if value in (None, "") else str(value)


def spec_changes(before: dict[str, Any] | None, after: dict[str, Any]) -> list[str]:
    """Return "name: old → new" for every field that differs (everything, for the first)."""
    if before is None:
        return [f"v{after.get('version')} {TIMES} {after.get('replicas')}"
                + (f", canary split {split_text(after['traffic'])}"
                   if after.get("traffic") else "")]
    names = [name for name in after if before.get(name) != after.get(name)]
    return [f"{LABELS.get(name, name)}: {_value(name, before.get(name))} → "
            f"{_value(name, after.get(name))}" for name in names]
