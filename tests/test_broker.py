"""The embedded default's Celery broker: kombu's SQLAlchemy transport on a SQLite file."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from kombu import Connection

from swarm_portal import broker

MESSAGES = 300
ROOT = Path(__file__).resolve().parents[1]


def connection(database: Path) -> Connection:
    return Connection(f"sqlite:///{database}", transport=broker.Transport,
                      transport_options={"connect_args": {"timeout": 30}})


def test_settings_use_kombus_sqlalchemy_transport_without_redis(settings):
    if settings.CELERY_BROKER_URL.startswith("redis"):
        return
    assert settings.CELERY_BROKER_TRANSPORT == "swarm_portal.broker:Transport"
    url = settings.CELERY_BROKER_URL
    assert url == f"sqlite:///{broker.broker_file(settings.VAR_DIR)}"
    with Connection(settings.CELERY_BROKER_URL, transport=settings.CELERY_BROKER_TRANSPORT,
                    transport_options=settings.CELERY_BROKER_TRANSPORT_OPTIONS) as conn:
        assert isinstance(conn.transport, broker.Transport)
        assert conn.transport.polling_interval == broker.POLLING_INTERVAL_S


def test_no_private_kombu_method_is_overridden():
    own = {name for name in vars(broker.Transport) if not name.startswith("__")}
    assert own == {"polling_interval"}


def test_a_reader_polling_while_another_process_writes_gets_every_message_once_whole(
        tmp_path):
    """The writer is another process, as the portal and beat are to the Celery worker."""
    database = tmp_path / "broker.sqlite3"
    received: list[dict] = []
    with connection(database) as conn:
        queue = conn.SimpleQueue("q")
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(database)], cwd=ROOT)
        try:
            while len(received) < MESSAGES:
                message = queue.get(block=True, timeout=30)
                received.append(message.payload)
                message.ack()
        finally:
            assert writer.wait(timeout=60) == 0
        assert queue.qsize() == 0
        queue.close()
    assert sorted(m["number"] for m in received) == list(range(MESSAGES))
    assert all(len(m["padding"]) == 4096 for m in received)


def test_delivered_messages_are_pruned_and_waiting_ones_kept(tmp_path):
    database = tmp_path / "broker.sqlite3"
    assert broker.prune_delivered(database, older_than_s=0) == 0  # no file yet
    with connection(database) as conn:
        queue = conn.SimpleQueue("q")
        for number in range(3):
            queue.put({"number": number})
        queue.get(timeout=5).ack()
        assert broker.prune_delivered(database, older_than_s=60) == 0  # too recent
        assert broker.prune_delivered(database, older_than_s=0,
                                      now_s=time.time() + 2) == 1
        assert queue.qsize() == 2
        rest = [queue.get(timeout=5) for _ in range(2)]
        for message in rest:
            message.ack()
        assert [message.payload["number"] for message in rest] == [1, 2]
        queue.close()
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone()[0] == 2


WRITER = f"""
import sys
from pathlib import Path
from tests.test_broker import connection
with connection(Path(sys.argv[1])) as conn:
    queue = conn.SimpleQueue("q")
    for number in range({MESSAGES}):
        queue.put({{"number": number, "padding": "x" * 4096}})
    queue.close()
"""
