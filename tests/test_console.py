"""make run's console: children's output goes to files; only error lines are echoed."""

from __future__ import annotations

import os
from pathlib import Path

from swarm_portal.console import MAX_READ_BYTES, ErrorEcho
from swarm_portal.supervisor import ChildSpec, Supervisor
from tests.waiting import wait_until


def test_error_echo_returns_only_new_error_lines(tmp_path: Path) -> None:
    log = tmp_path / "celery.log"
    log.write_bytes(b"[x: ERROR/MainProcess] before the launcher started\n")
    echo = ErrorEcho({"celery": log})
    with log.open("ab") as file:
        file.write(b"INFO: Started server process\n -------------- celery@vm banner\n"
                   b"2026-11-30 10:00:00,000 ERROR serving.tasks: sweep failed\n"
                   b"Traceback (most recent call last):\n  File \"x.py\"\n"
                   b"[2026: WARNING/MainProcess] a warni")
    assert echo.poll() == [
        f"celery: 2026-11-30 10:00:00,000 ERROR serving.tasks: sweep failed  (more in {log})",
        f"celery: Traceback (most recent call last):  (more in {log})"]
    with log.open("ab") as file:
        file.write(b"ng, then CRITICAL on the same line\n")
    assert echo.poll() == [f"celery: [2026: WARNING/MainProcess] a warning, then CRITICAL "
                           f"on the same line  (more in {log})"]
    assert echo.poll() == []


def test_error_echo_survives_truncation_floods_and_missing_files(tmp_path: Path) -> None:
    log = tmp_path / "portal.log"
    echo = ErrorEcho({"portal": log, "gone": tmp_path / "never-written.log"})
    log.write_bytes(b"x" * (MAX_READ_BYTES * 2) + b"\nERROR at the end\n")
    assert echo.poll() == [f"portal: ERROR at the end  (more in {log})"]
    log.write_bytes(b"ERROR after a truncation\n")
    assert echo.poll() == [f"portal: ERROR after a truncation  (more in {log})"]


def test_a_child_with_a_log_path_writes_there_not_to_the_console(tmp_path: Path,
                                                                 capfd) -> None:
    log = tmp_path / "child.log"
    child = ChildSpec("talker", ["/bin/sh", "-c", "echo out; echo err >&2"], tmp_path,
                      dict(os.environ), log_path=log)
    supervisor = Supervisor([child])
    supervisor.start_all()
    try:
        wait_until(lambda: log.exists() and log.read_text() in ("out\nerr\n", "err\nout\n"),
                   10, "the child's output in its log")
    finally:
        supervisor.stop(["talker"])
    assert "out" not in capfd.readouterr().out
