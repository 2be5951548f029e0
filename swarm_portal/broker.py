"""The embedded default's Celery broker: kombu's SQLAlchemy transport on a SQLite file.

Kombu's own transport does the work, so no private method of kombu is overridden here
(the filesystem transport we used before needed two, and kombu is not pinned). It is
safe across processes: a consumer takes a message inside `BEGIN IMMEDIATE`, SQLite's
write lock, and a publisher's row is committed whole or not at all.

Two things kombu leaves to us:
- its polling interval (1 s) is a class attribute that cannot be set through the
  transport options (they all go to `create_engine`): a subclass sets it, so the
  auto-scaler's tick and cold-start activations are picked up within 0.1 s;
- delivered messages stay in the table (`visible` false) for ever: `prune_delivered`
  deletes old ones, and the launcher calls it now and then.

No Django here: the launcher imports it. Settings name the transport by its path, so
only a process that uses the broker imports SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from kombu.transport import sqlalchemy

BROKER_FILE_NAME = "celery-broker.sqlite3"
POLLING_INTERVAL_S = 0.1
SQLITE_BUSY_TIMEOUT_S = 30.0
MESSAGE_TABLE = "kombu_message"  # kombu's default `message_tablename`


class Transport(sqlalchemy.Transport):
    """Kombu's SQLAlchemy transport, polling every POLLING_INTERVAL_S."""

    polling_interval = POLLING_INTERVAL_S


def broker_file(var_dir: Path) -> Path:
    """Return the embedded broker's SQLite file (settings.CELERY_BROKER_URL names it)."""
    return Path(var_dir).resolve() / BROKER_FILE_NAME


def prune_delivered(database: Path, older_than_s: float, now_s: float | None = None) -> int:
    """Delete messages delivered more than `older_than_s` ago; return how many."""
    if not database.exists():
        return 0
    cutoff = time.time() - older_than_s if now_s is None else now_s - older_than_s
    # kombu stamps a message (column `timestamp`) with the local time when it delivers
    # it; SQLite keeps that as text, which sorts as time does.
    cutoff_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cutoff))
    with sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_S) as connection:
        try:
            cursor = connection.execute(
                f"DELETE FROM {MESSAGE_TABLE} WHERE visible = 0 AND timestamp < ?",  # noqa: S608
                (cutoff_text,))
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return 0
            raise
        return cursor.rowcount
