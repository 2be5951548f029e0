"""Split a deployment's traffic between its versions, for canaries (pure: no Django)."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping


def pick_version(weights: Mapping[int, float], rng: random.Random) -> int:
    """Return a version drawn with probability proportional to its weight."""
    total = 0.0
    for version, weight in weights.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"version {version} has weight {weight!r}; weights must be >= 0")
        total += weight
    if total <= 0:
        raise ValueError("no version has a positive weight")
    point = rng.random() * total
    last_positive = 0
    for version, weight in weights.items():
        if weight > 0:  # a zero weight spans no interval, so it can never be drawn
            last_positive = version
            point -= weight
            if point < 0:
                return version
    # Rounding can leave the point just past the last interval: it belongs to that one.
    return last_positive


def restrict_to_version(weights: Mapping[int, float], pinned_version: int) -> dict[int, float]:
    """Return weights that send everything to the pinned version, or {} if it is not served.

    A pinned version is served even at weight 0: that is how an operator tries a
    canary by name before shifting any unpinned traffic to it.
    """
    return {pinned_version: 1.0} if pinned_version in weights else {}


def version_for_request(weights: Mapping[int, float], rng: random.Random,
                        pinned_version: int | None = None) -> int | None:
    """Return the version one request goes to, or None when its pinned version is not served."""
    if pinned_version is not None:
        return pinned_version if restrict_to_version(weights, pinned_version) else None
    return pick_version(weights, rng)
