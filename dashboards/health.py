"""Is a deployment healthy? (pure: no Django, the clock is passed in)

The deployments list colours a row and says why: replicas pending for long (they fit
no node), replicas that failed recently, or an error rate above the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

PENDING_TOO_LONG_S = 60.0  # placement retries every few seconds: a minute is not a blip
FAILED_RECENTLY_S = 600.0  # a failure older than this no longer colours the row
ERROR_RATE_BAD = 0.05  # of requests, over the last chart step
OK, WARN, BAD = "ok", "warn", "bad"


@dataclass(frozen=True)
class ReplicaFacts:
    """What the health check needs of a deployment's replicas."""

    pending: int = 0
    pending_since_s: float | None = None  # the oldest pending replica's state change
    failed_recently: int = 0
    pending_reason: str = ""


@dataclass(frozen=True)
class Health:
    level: str  # "ok", "warn" or "bad"
    reasons: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """Return the reasons as one line ("" when healthy)."""
        return "; ".join(self.reasons)


def deployment_health(facts: ReplicaFacts, error_rate: float | None, now_s: float) -> Health:
    """Return the deployment's health: bad (failures, errors), warn (pending long), or ok."""
    bad, warn = [], []
    if facts.failed_recently:
        bad.append(f"{facts.failed_recently} failed in the last "
                   f"{FAILED_RECENTLY_S / 60:g} min")
    if error_rate is not None and error_rate > ERROR_RATE_BAD:
        bad.append(f"errors {100 * error_rate:.1f}% > {100 * ERROR_RATE_BAD:g}%")
    if facts.pending and facts.pending_since_s is not None:
        waited_s = now_s - facts.pending_since_s
        if waited_s >= PENDING_TOO_LONG_S:
            reason = f": {facts.pending_reason}" if facts.pending_reason else ""
            warn.append(f"{facts.pending} pending for {_duration(waited_s)}{reason}")
    if bad:
        return Health(BAD, tuple(bad + warn))
    return Health(WARN, tuple(warn)) if warn else Health(OK)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"
