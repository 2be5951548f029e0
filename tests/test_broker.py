"""The embedded default's Celery broker: kombu's filesystem transport, with atomic writes."""

from __future__ import annotations

import threading
from pathlib import Path

from kombu import Connection

from swarm_portal.kombu_filesystem import Transport

MESSAGES = 400


def connection(folder: Path, polling_interval_s: float = 0.0) -> Connection:
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder),
               "control_folder": str(folder / "control"), "polling_interval": polling_interval_s}
    return Connection("filesystem://", transport=Transport, transport_options=options)


def test_settings_use_the_atomic_transport_without_redis(settings):
    if not settings.CELERY_BROKER_URL.startswith("redis"):
        assert settings.CELERY_BROKER_TRANSPORT == "swarm_portal.kombu_filesystem:Transport"


def test_a_reader_polling_while_messages_are_written_gets_every_one_whole(tmp_path):
    """Kombu's own transport fails this: its reader can take a file before it is written."""
    received: list[dict] = []
    errors: list[BaseException] = []

    def write() -> None:
        with connection(tmp_path) as conn:
            queue = conn.SimpleQueue("q")
            for number in range(MESSAGES):
                queue.put({"number": number, "padding": "x" * 4096})
            queue.close()

    def read() -> None:
        try:
            with connection(tmp_path) as conn:
                queue = conn.SimpleQueue("q")
                while len(received) < MESSAGES:
                    message = queue.get(block=True, timeout=30)
                    received.append(message.payload)
                    message.ack()
                queue.close()
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    write()
    reader.join(timeout=60)
    assert errors == []
    assert sorted(m["number"] for m in received) == list(range(MESSAGES))
    assert all(len(m["padding"]) == 4096 for m in received)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
