"""Cold-start activation: the gateway API asks the auto-scaler to start a held deployment.

The scaling app registers its activator in ScalingConfig.ready(); serving calls `activate`
without naming scaling or its Celery task. With no auto-scaler installed, `activate` raises
NoActivator (the gateway API answers 503).
"""

from __future__ import annotations

from collections.abc import Callable

# (deployment_id, held requests) -> None; returns at once (queues the work), raises on a
# broker failure (kombu.exceptions.KombuError or OSError).
Activator = Callable[[int, int], None]

_registered: list[Activator] = []


class NoActivator(RuntimeError):
    """No auto-scaler registered an activator in this process."""


def register(activator: Activator) -> None:
    """Make `activator` the one `activate` calls (the last registration wins)."""
    _registered[:] = [activator]


def activate(deployment_id: int, held: int) -> None:
    """Ask the auto-scaler to start `deployment_id`; raise NoActivator when there is none."""
    if not _registered:
        raise NoActivator("no auto-scaler is installed")
    _registered[0](deployment_id, held)
