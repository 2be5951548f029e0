"""tests/live.py's LivePortal: a start that fails leaves no process and no held port."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.live import LivePortal


def test_a_portal_that_fails_to_start_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    portal = LivePortal(port, tmp_path, gateway=True,
                        DJANGO_SETTINGS_MODULE="no_such_settings_module")
    with pytest.raises(AssertionError, match="the portal exited"):
        portal.start(timeout_s=30)
    assert portal.proc is not None and portal.proc.poll() is not None  # reaped
    with socket.socket() as again:  # the port LivePortal held for its gateway is free
        again.bind(("127.0.0.1", port))
