"""publish(message): deliver a live message to every open page of its groups, after commit.

Three routes, chosen per call:
- this process hosts consumers on a running event loop (the portal): schedule the
  group_send on that loop, fire and forget (works for any layer, from any thread);
- the channel layer reaches other processes (Redis): group_send here and now;
- the layer is in-memory and the consumers live elsewhere (Celery in the embedded
  default): write the message to the outbox (LiveEvent) for the portal's relay.
Publishing never fails the caller: errors are logged and the message dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.db import transaction
from django.utils import timezone

from dashboards.messages import LiveMessage

log = logging.getLogger(__name__)
HANDLER = "dashboard.message"  # the consumers' method: dashboard_message

_state: dict[str, Any] = {"hosts_consumers": False, "loop": None}
_pending: set[asyncio.Task[None]] = set()


def mark_consumer_host() -> None:
    """Say this process serves the dashboards' sockets (asgi.py calls it at import)."""
    _state["hosts_consumers"] = True


def attach_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Remember the event loop the consumers run on (called on each socket connect)."""
    _state["hosts_consumers"] = True
    _state["loop"] = loop


def _consumer_loop() -> asyncio.AbstractEventLoop | None:
    loop = _state["loop"]
    if loop is None or loop.is_closed() or not loop.is_running():
        return None
    return loop


def layer_reaches_other_processes(layer: Any = None) -> bool:
    layer = layer or get_channel_layer()
    return layer is not None and not isinstance(layer, InMemoryChannelLayer)


def event_for(message: LiveMessage) -> dict[str, Any]:
    """Return what goes over the channel layer for a message."""
    return {"type": HANDLER, "payload": message.to_dict()}


async def send_to_groups(groups: tuple[str, ...] | list[str], event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    for group in groups:
        await layer.group_send(group, event)


def publish(message: LiveMessage) -> None:
    """Deliver the message once the current transaction commits (at once outside one)."""
    transaction.on_commit(lambda: send_now(message))


def publish_built(build: Callable[[], LiveMessage | list[LiveMessage] | None]) -> None:
    """Build the message(s) after commit (so they see committed rows), then deliver them."""
    def run() -> None:
        try:
            built = build()
        except Exception:
            log.exception("building a live message failed; dropped")
            return
        for message in built if isinstance(built, list) else [built] if built else []:
            send_now(message)
    transaction.on_commit(run)


def send_now(message: LiveMessage) -> None:
    """Deliver a message by the cheapest route that reaches the pages; never raise."""
    try:
        _route(message)
    except Exception:
        log.exception("publishing %s failed; dropped", message.type)


def _route(message: LiveMessage) -> None:
    event = event_for(message)
    loop = _consumer_loop()
    if loop is not None:
        future = asyncio.run_coroutine_threadsafe(send_to_groups(message.groups, event), loop)
        future.add_done_callback(_log_failure)
    elif layer_reaches_other_processes():
        _send_from_this_thread(message.groups, event)
    elif not _state["hosts_consumers"] and message.durable:
        _write_outbox(message.groups, event["payload"])
    # else: nobody can hear it (no open socket here), or a figure that would arrive stale.


def _send_from_this_thread(groups: tuple[str, ...], event: dict[str, Any]) -> None:
    """group_send from a thread with no consumers; async_to_sync refuses a thread whose
    event loop runs (a caller driven by one, e.g. Playwright's sync API): schedule there."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        async_to_sync(send_to_groups)(groups, event)
        return
    task = running.create_task(send_to_groups(groups, event))
    _pending.add(task)  # keep a reference until it is done
    task.add_done_callback(_pending.discard)
    task.add_done_callback(_log_failure)


def _log_failure(future: Future[Any] | asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("publishing a live message failed: %s", future.exception())


def _write_outbox(groups: tuple[str, ...], payload: dict[str, Any]) -> None:
    from dashboards.models import LiveEvent

    now = timezone.now()
    LiveEvent.objects.bulk_create(
        [LiveEvent(group=group, payload=payload, created=now) for group in groups])
