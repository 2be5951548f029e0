"""The outbox relay: in the portal process, send outbox rows (LiveEvent) to local consumers.

Runs only with the in-memory channel layer (the embedded default), as one asyncio task per
event loop, started by the first socket that connects. Every RELAY_INTERVAL_S it reads the
rows of the last few seconds that it has not sent yet, sends them to its own consumers and,
now and then, deletes rows older than KEEP_S. Each portal process keeps its own cursor, so
several processes each deliver every row to their own pages. Reading a short window rather
than "ids above the last one" also catches a row whose id was taken before a row already
sent but committed after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.utils import timezone

from dashboards import bus

log = logging.getLogger(__name__)
RELAY_INTERVAL_S = 0.2
WINDOW_S = 10.0
KEEP_S = 60.0
PRUNE_EVERY_S = 15.0
BATCH_ROWS = 500

_tasks: dict[int, asyncio.Task[None]] = {}


@dataclass
class RelayCursor:
    """What one relay has sent: row ids with the time they were sent, and the start id."""

    after_id: int
    sent: dict[int, float] = field(default_factory=dict)
    pruned_at_s: float = 0.0

    def forget_old(self, now_s: float) -> None:
        self.sent = {pk: at for pk, at in self.sent.items() if now_s - at < WINDOW_S * 2}


def start_relay() -> None:
    """Start the relay on the running loop, once per loop (no-op when Redis carries events)."""
    if bus.layer_reaches_other_processes():
        return
    loop = asyncio.get_running_loop()
    task = _tasks.get(id(loop))
    if task is not None and not task.done():
        return
    _tasks[id(loop)] = loop.create_task(relay_forever(), name="dashboards-outbox-relay")


async def relay_forever() -> None:
    cursor = RelayCursor(after_id=await database_sync_to_async(_last_id)())
    while True:
        try:
            await relay_step(cursor)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the dashboards' outbox relay failed a step; going on")
        await asyncio.sleep(RELAY_INTERVAL_S)


async def relay_step(cursor: RelayCursor) -> int:
    """Send the rows not sent yet; prune now and then. Return how many were sent."""
    now_s = time.monotonic()
    rows = await database_sync_to_async(_unsent_rows)(cursor)
    for pk, group, payload in rows:
        await bus.send_to_groups([group], {"type": bus.HANDLER, "payload": payload})
        cursor.sent[pk] = now_s
    cursor.forget_old(now_s)
    if now_s - cursor.pruned_at_s >= PRUNE_EVERY_S:
        cursor.pruned_at_s = now_s
        await database_sync_to_async(prune)()
    return len(rows)


def _last_id() -> int:
    from dashboards.models import LiveEvent

    return LiveEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


def _unsent_rows(cursor: RelayCursor) -> list[tuple[int, str, Any]]:
    from dashboards.models import LiveEvent

    since = timezone.now() - timedelta(seconds=WINDOW_S)
    rows = (LiveEvent.objects.filter(id__gt=cursor.after_id, created__gte=since)
            .exclude(id__in=list(cursor.sent)).order_by("id"))
    return list(rows.values_list("id", "group", "payload")[:BATCH_ROWS])


def prune(keep_s: float = KEEP_S) -> int:
    """Delete outbox rows older than keep_s; return how many."""
    from dashboards.models import LiveEvent

    deleted, _ = LiveEvent.objects.filter(
        created__lt=timezone.now() - timedelta(seconds=keep_s)).delete()
    return deleted
