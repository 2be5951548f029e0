"""Scale from zero: hold requests for a deployment with no replica while one starts.

A deployment whose auto-scaling policy allows zero replicas has `hold_timeout_s > 0` in
its route. A request that finds no replica waits in the deployment's wait queue (so the
queue limit bounds how many are held) until a routing table lists a replica, or until
the hold timeout, then 503. While requests are held the gateway asks the auto-scaler to
activate the deployment at once (the activator), and again every `report_every_s` with
the current count, so the decision does not wait for the next tick and sees the demand.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from serving.gateway.deployments import DeploymentRuntime

# (deployment id, requests held now) -> asks the auto-scaler to start a replica.
Activator = Callable[[int, int], Awaitable[None]]
logger = logging.getLogger("serving.gateway")
_ADMITTED = 1 << 30  # the queue limit was checked on entry; a held request never re-queues


class ColdStarts:
    """Held requests per deployment, and the activation calls they trigger."""

    def __init__(self, activator: Activator | None, report_every_s: float = 1.0) -> None:
        self._activator = activator
        self._report_every_s = report_every_s
        self.held: dict[str, int] = {}
        self._last_report_s: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def hold(self, runtime: DeploymentRuntime, timeout_s: float) -> str | None:
        """Wait for a replica of a deployment at zero: None once one is listed, else why not."""
        if runtime.waiting.depth >= runtime.route.queue_limit:
            return f"{runtime.name!r} is scaled to zero and its hold queue is full"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.held[runtime.name] = self.held.get(runtime.name, 0) + 1
        try:
            while not runtime.route.replicas:
                if runtime.route.hold_timeout_s <= 0:  # the policy went: stop holding
                    return f"{runtime.name!r} is scaled to zero"
                self._report(runtime, loop.time())
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    return (f"{runtime.name!r} is scaled to zero and no replica became "
                            f"ready within {timeout_s:g} s")
                # Woken by every new table; the timeout only paces the re-reports.
                await runtime.waiting.wait(None, _ADMITTED,
                                           min(remaining_s, self._report_every_s))
            return None
        finally:
            self.held[runtime.name] -= 1

    def _report(self, runtime: DeploymentRuntime, now_s: float) -> None:
        """Ask for activation, at most once per `report_every_s` per deployment."""
        if self._activator is None:
            return
        last_s = self._last_report_s.get(runtime.name)
        if last_s is not None and now_s - last_s < self._report_every_s:
            return
        self._last_report_s[runtime.name] = now_s
        task = asyncio.get_running_loop().create_task(
            self._activate(runtime.route.deployment_id, self.held[runtime.name]))
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _activate(self, deployment_id: int, held: int) -> None:
        assert self._activator is not None
        try:
            await self._activator(deployment_id, held)
        except Exception:
            # The tick will still see the held requests: a lost activation only delays.
            logger.exception("could not ask the auto-scaler to activate deployment %s",
                             deployment_id)

    def cancel(self) -> None:
        """Cancel activation calls still running (the app is closing)."""
        for task in list(self._tasks):
            task.cancel()
