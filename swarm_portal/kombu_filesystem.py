"""Kombu's filesystem transport with atomic writes: the embedded default's Celery broker.

Kombu's own `_put` creates the message file and then writes it, while `_get` moves and
reads files without taking the writer's lock, so a worker polling at the wrong moment
reads an empty file and dies on a JSON error (seen here with a 0.1 s polling interval).
Here a message is written under a name `_get` ignores and renamed into place, which is
atomic on one filesystem: a reader sees a whole message or none. The exchange table file
had the same gap when first created; it is now created whole.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    """A filesystem channel whose messages appear whole."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # A leading dot: `_get` matches "<stamp>.<queue>.msg" and skips this name.
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as file:
                file.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        # Kombu creates a missing exchange file empty, then locks and fills it: a reader
        # between the two parses "" and fails. Create it whole (an empty table) first, so
        # kombu always takes its locked read-modify-write path.
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        if not file.exists():
            partial = file.with_name(f".{file.name}.{uuid.uuid4()}.partial")
            partial.write_bytes(str_to_bytes(dumps([])))
            try:
                os.link(partial, file)  # atomic, and never replaces a table already there
            except FileExistsError:
                pass
            finally:
                partial.unlink()
        super()._queue_bind(exchange, routing_key, pattern, queue)


class Transport(filesystem.Transport):
    """The filesystem transport with `Channel` above."""

    Channel = Channel
