"""Replica output: the agent's reader, the portal's ring, the API, the page, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
from django.core.cache import cache
from django.test import Client

from serving import log_ring
from serving.agent import logs as agent_logs
from serving.agent.logs import LogTail, clean_line
from serving.models import Node, Replica, ReplicaState
from swarm_protocol.agent_messages import HeartbeatRequest, ReplicaStatus
from tests import factories
from tests.cache_tools import clear_own_cache
from tests.conftest import free_port
from tests.dashboards_helpers import gpu, register_node
from tests.e2e import LiveAgent
from tests.live import ROOT, LivePortal
from tests.test_agent_replicas import make_manager, step_until_state
from tests.waiting import wait_until

KEY = "replica-key-1"


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as output:
        output.write(data)


# --- the agent's reader -------------------------------------------------------------------


def test_the_reader_sends_new_complete_lines_with_controls_escaped(tmp_path: Path) -> None:
    append(tmp_path / "stdout.log", b"before this agent looked\n")
    tail = LogTail(tmp_path)
    append(tmp_path / "stdout.log", b"hello\n\x1b[2Jwiped\r\n<b>bold</b>\nunfinish")
    append(tmp_path / "stderr.log", b"bad \xff byte \xe2\x80\xae reversed\x00\n")

    sent = list(tail.collect())
    assert sent == ["hello", "\\x1b[2Jwiped", "<b>bold</b>",
                    "bad \ufffd byte \\u202e reversed\\x00"]
    assert tail.collect() == sent  # not acknowledged: a failed heartbeat sends them again
    tail.acknowledge(len(sent))
    assert tail.collect() == []  # the unfinished line waits for its newline
    append(tmp_path / "stdout.log", b"ed\n")
    assert tail.collect() == ["unfinished"]


def test_cleaning_is_idempotent_and_cuts_long_lines() -> None:
    once = clean_line("\x1b]0;title\x07" + "x" * 5000)
    assert clean_line(once) == once
    assert len(once) == agent_logs.MAX_LINE_CHARS and once.endswith(agent_logs.CUT_MARK)
    assert once.startswith("\\x1b]0;title\\x07")


def test_a_heartbeat_carries_at_most_200_lines_and_32_kib_a_replica(tmp_path: Path) -> None:
    tail = LogTail(tmp_path)
    append(tmp_path / "stdout.log", b"".join(b"line %04d\n" % i for i in range(1000)))
    first = tail.collect()
    assert len(first) == agent_logs.MAX_LINES_PER_HEARTBEAT and first[0] == "line 0000"
    tail.acknowledge(len(first))
    assert tail.collect()[0] == "line 0200"  # the rest follows, in order
    tail.acknowledge(200)

    wide = LogTail(tmp_path / "wide")
    (tmp_path / "wide").mkdir()
    append(tmp_path / "wide" / "stderr.log", (b"y" * 900 + b"\n") * 100 + b"z" * 10_000 + b"\n")
    lines = wide.collect()
    assert sum(len(line) for line in lines) <= agent_logs.MAX_BYTES_PER_HEARTBEAT
    wide.acknowledge(len(lines))
    while "z" not in "".join(lines):
        lines = wide.collect()
        wide.acknowledge(len(lines))
    [cut] = [line for line in lines if line.startswith("z")]
    assert len(cut) == agent_logs.MAX_LINE_CHARS and cut.endswith(agent_logs.CUT_MARK)


def test_a_chatty_replica_cannot_fill_the_disk(tmp_path: Path) -> None:
    tail = LogTail(tmp_path, max_file_bytes=64 * 1024)
    with (tmp_path / "stdout.log").open("ab") as replica_stdout:  # O_APPEND, as launched
        replica_stdout.write(b"chatter " * 1000 + b"\n" + b"last words\n" * 10_000)
        replica_stdout.flush()
        lines = tail.collect()
        assert (tmp_path / "stdout.log").stat().st_size == 0  # capped
        kept = (tmp_path / "stdout.log.1").read_bytes()
        assert kept.endswith(b"last words\n") and len(kept) <= agent_logs.KEEP_ON_ROTATE_BYTES
        assert lines[-1].startswith("[swarm: ") and "bytes of output skipped" in lines[-1]
        replica_stdout.write(b"after the cap\n")
        replica_stdout.flush()
    assert (tmp_path / "stdout.log").stat().st_size == len(b"after the cap\n")  # no hole
    tail.acknowledge(len(lines))
    assert tail.collect() == ["after the cap"]


def test_a_reader_far_behind_jumps_to_the_recent_output(tmp_path: Path) -> None:
    tail = LogTail(tmp_path)
    append(tmp_path / "stderr.log", b"old line\n" * 100_000 + b"recent\n")
    lines = tail.collect()
    assert "bytes of output skipped" in lines[0] and lines[1] == "old line"
    heartbeats = 1
    while lines[-1] != "recent":  # what is left to send is one heartbeat's worth of bytes
        tail.acknowledge(len(lines))
        lines = tail.collect()
        heartbeats += 1
    assert heartbeats <= agent_logs.MAX_BYTES_PER_HEARTBEAT // (9 * 200) + 1


def test_the_reader_and_the_ring_import_no_django() -> None:
    code = ("import sys, serving.agent.logs, serving.agent.replicas, serving.log_ring; "
            "assert not any(m == 'django' or m.startswith('django.') for m in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- the agent's replica manager, with fake replica processes ------------------------------


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def test_a_replica_reports_its_output_start_time_and_restarts(tmp_path: Path,
                                                             executor: ThreadPoolExecutor) -> None:
    from tests.test_agent_replicas import fake

    manager = make_manager(tmp_path, executor)
    try:
        before_s = time.time()
        manager.reconcile([fake(5, "ok"), fake(6, "crash")], KEY, time.monotonic())
        step_until_state(manager, 5, "ready")
        step_until_state(manager, 6, "failed")

        def reported() -> dict[int, ReplicaStatus]:
            manager.collect_logs()
            return {status.replica_id: status for status in manager.statuses()}
        ready = wait_until(lambda: reported()[5].log_lines and reported()[5],
                           what="the ready line")
        assert any(line.startswith("REPLICA READY port=") for line in ready.log_lines)
        assert ready.started_at_s is not None and before_s <= ready.started_at_s <= time.time()
        assert ready.restarts == 0
        crashed = reported()[6]  # a failed replica's last words are the most useful
        assert "RuntimeError: fake replica cannot load its model" in crashed.log_lines
        manager.acknowledge_logs(manager.statuses())
        assert all(not status.log_lines for status in reported().values())
    finally:
        manager.drain_all(time.monotonic())
        wait_until(lambda: not manager.step(time.monotonic()) and manager.live_count() == 0,
                   what="cleanup")
        manager.close()


# --- the portal's ring (pure) ---------------------------------------------------------------


class Ring:
    """A ring kept in a dict as the cache keeps it: an index and chunks by number."""

    def __init__(self) -> None:
        self.index: dict[str, Any] | None = None
        self.chunks: dict[int, list[Any]] = {}
        self.widest_write = 0

    def add(self, texts: list[str], at_s: float = 1.0) -> None:
        index = self.index
        newest = self.chunks.get(index["chunks"][-1][0]) if index and index["chunks"] else None
        write = log_ring.appended(index, newest, texts, at_s)
        self.chunks.update(write.chunks)
        for number in write.dropped:
            del self.chunks[number]
        self.index = write.index
        self.widest_write = max(self.widest_write, len(write.chunks))

    def read(self, after: int | None, limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        wanted = log_ring.chunks_to_read(self.index, after, limit)
        chunks = {n: self.chunks[n] for n in wanted if n in self.chunks}  # what it asked
        return log_ring.lines_after(self.index, chunks, after, limit)

    def texts(self) -> list[str]:
        return [line[2] for number in sorted(self.chunks) for line in self.chunks[number]]


def test_the_ring_keeps_about_the_last_1000_lines_or_256_kib_in_chunks() -> None:
    ring = Ring()
    for batch in range(8):
        ring.add([f"b{batch} l{i}" for i in range(200)])
    assert ring.index is not None and ring.index["next"] == 1601
    assert 875 <= len(ring.texts()) <= 1000 and ring.texts()[-1] == "b7 l199"
    assert len(ring.chunks) <= log_ring.MAX_CHUNKS
    assert ring.widest_write <= 3  # an append rewrites a chunk or three, not the ring
    lines, cursor = ring.read(None, 1000)
    assert [line["text"] for line in lines] == ring.texts() and cursor == 1600

    wide = Ring()
    for _ in range(20):
        wide.add(["w" * 1024] * 200)
    assert 224 * 1024 <= sum(map(len, wide.texts())) <= 256 * 1024
    # One heartbeat adds at most 32 KiB: 200 lines of 1 KiB are cut to 32 of them.
    one = Ring()
    one.add(["w" * 1024] * 200)
    assert one.index is not None and one.index["next"] == 33


def test_reading_after_a_seq_follows_and_survives_a_lost_ring() -> None:
    ring = Ring()
    ring.add(["a", "b", "c", "d"], 1_700_000_000.0)
    tail, cursor = ring.read(None, 2)
    assert [line["text"] for line in tail] == ["c", "d"] and cursor == 4
    assert tail[0] == {"seq": 3, "at": "2023-11-14T22:13:20Z", "text": "c"}
    assert ring.read(4) == ([], 4)
    ring.add(["e"], 1_700_000_001.0)
    assert [line["text"] for line in ring.read(4)[0]] == ["e"]
    for batch in range(10):  # a follower reading page by page sees every line, in order
        ring.add([f"{batch}-{i}" for i in range(100)])
    seen, cursor = [], 5
    while True:
        page, cursor = ring.read(cursor, 70)
        if not page:
            break
        seen.extend(line["seq"] for line in page)
    assert seen == list(range(seen[0], 1006)) and cursor == 1005

    restarted = Ring()  # the cache lost the old ring: a reader's cursor is beyond it
    restarted.add(["x"])
    assert [line["text"] for line in restarted.read(1005)[0]] == ["x"]
    assert log_ring.lines_after(None, {}, None, 10) == ([], 0)
    assert log_ring.chunks_to_read(None, None, 10) == log_ring.chunks_to_read(None, 3, 10) == []


def test_a_ring_whose_newest_chunk_expired_goes_on_in_a_new_one() -> None:
    ring = Ring()
    ring.add(["a", "b"])
    assert ring.index is not None
    ring.chunks.clear()  # the cache dropped the chunk, not the index
    ring.add(["c"])
    assert ring.read(None, 10) == ([{"seq": 3, "at": ANY, "text": "c"}], 3)


def test_the_last_error_line_is_picked_from_the_output() -> None:
    lines = ["INFO ready", "Traceback (most recent call last):", "  File x", "ValueError: bad",
             "INFO still serving"]
    assert log_ring.last_error(lines, 5.0) == {"at_s": 5.0, "text": "ValueError: bad"}
    assert log_ring.last_error(["all good", "errors=0 is fine?"], 5.0) is None


# --- the agent API and the replica API ------------------------------------------------------


def heartbeat(secret: str, statuses: list[ReplicaStatus]) -> Any:
    body = HeartbeatRequest(devices=[gpu()], replicas=statuses).to_dict()
    return Client(raise_request_exception=False).post(
        "/api/agent/heartbeat", json.dumps(body), content_type="application/json",
        headers={"Authorization": f"Bearer {secret}"})


@pytest.fixture
def placed(served_deployment, gpu_node) -> tuple[Replica, str]:
    clear_own_cache()
    replica = served_deployment.replica_set.get()
    assert replica.node_id == gpu_node.pk
    return replica, gpu_node.secret


@pytest.mark.django_db
def test_lines_an_agent_pushes_are_read_through_the_api(placed, viewer_api, operator_api):
    replica, secret = placed
    started_s = time.time() - 30
    status = ReplicaStatus(replica_id=replica.pk, state="ready", port=9100, in_flight=3,
                           latency_p50_ms=4.5, started_at_s=started_s, restarts=1,
                           log_lines=["booting", "<script>alert(1)</script>",
                                      "\x1b[31mRuntimeError: CUDA out of memory\x1b[0m"])
    assert heartbeat(secret, [status]).status_code == 200

    answer = viewer_api.get(f"/api/replicas/{replica.pk}/logs/")
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert [line["text"] for line in body["lines"]] == [
        "booting", "<script>alert(1)</script>",
        "\\x1b[31mRuntimeError: CUDA out of memory\\x1b[0m"]
    assert [line["seq"] for line in body["lines"]] == [1, 2, 3] and body["next"] == 3
    assert operator_api.get(f"/api/replicas/{replica.pk}/logs/?after=3").json() == {
        "lines": [], "next": 3}
    row = viewer_api.get(f"/api/replicas/{replica.pk}/").json()
    assert row["restarts"] == 1 and row["in_flight"] == 3 and row["latency_p50_ms"] == 4.5
    assert 29 <= row["uptime_s"] <= 120
    assert row["last_error"] == "\\x1b[31mRuntimeError: CUDA out of memory\\x1b[0m"
    [listed] = viewer_api.get("/api/replicas/?deployment=mlp").json()["results"]
    assert listed["last_error"] == row["last_error"]

    assert heartbeat(secret, [ReplicaStatus(replica_id=replica.pk, state="ready",
                                            log_lines=["next one"])]).status_code == 200
    followed = viewer_api.get(f"/api/replicas/{replica.pk}/logs/?after=3&limit=5").json()
    assert [(line["seq"], line["text"]) for line in followed["lines"]] == [(4, "next one")]
    # The lines went to the ring, not into the figures every node list reads.
    figures = str(cache.get(f"node:{replica.node_id}:live"))
    assert "next one" not in figures and "log_lines" in figures


@pytest.mark.django_db
def test_an_agent_cannot_post_lines_for_another_nodes_replica(placed, join_secret,
                                                              viewer_api):
    replica, _secret = placed
    intruder = register_node(join_secret, "gpu-b")
    forged = ReplicaStatus(replica_id=replica.pk, state="ready", log_lines=["forged"],
                           restarts=99, started_at_s=1.0)
    assert heartbeat(intruder.secret, [forged]).status_code == 200
    assert viewer_api.get(f"/api/replicas/{replica.pk}/logs/").json()["lines"] == []
    row = viewer_api.get(f"/api/replicas/{replica.pk}/").json()
    assert row["restarts"] is None and row["uptime_s"] is None  # its figures do not count
    assert Replica.objects.get(pk=replica.pk).node_id != intruder.pk


@pytest.mark.django_db
@pytest.mark.parametrize(("lines", "fragment"), [
    (["x"] * 201, "more than 200 items"),
    (["x" * 1025], "longer than 1024 characters"),
    (["nul \x00"], "without NUL"),
    ([7], "must be a string"),
])
def test_oversized_or_malformed_lines_are_a_400(placed, lines, fragment):
    replica, secret = placed
    body = HeartbeatRequest(devices=[gpu()], replicas=[]).to_dict()
    body["replicas"] = [{"replica_id": replica.pk, "state": "ready", "log_lines": lines}]
    answer = Client().post("/api/agent/heartbeat", json.dumps(body),
                           content_type="application/json",
                           headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 400 and fragment in answer.json()["error"]


@pytest.mark.django_db
@pytest.mark.parametrize("query", ["after=-1", "after=abc", "limit=0", "limit=1001",
                                   "after=99999999999", "after=1%00"])
def test_bad_log_queries_are_a_400(placed, viewer_api, query):
    replica, _secret = placed
    answer = viewer_api.get(f"/api/replicas/{replica.pk}/logs/?{query}")
    assert answer.status_code == 400 and "error" in answer.json()


@pytest.mark.django_db
def test_logs_need_a_login_and_a_known_replica(placed, viewer_api):
    replica, _secret = placed
    assert Client().get(f"/api/replicas/{replica.pk}/logs/").status_code in (401, 403)
    missing = viewer_api.get("/api/replicas/999999/logs/")
    assert missing.status_code == 404 and "error" in missing.json()


@pytest.mark.django_db
def test_the_deployment_page_has_a_logs_panel_for_its_replicas(placed, operator):
    replica, _secret = placed
    browser = Client()
    browser.force_login(operator)
    page = browser.get("/deployments/mlp/").content.decode()
    assert 'id="replica-logs"' in page and 'data-url="/api/replicas/"' in page
    assert f'<option value="{replica.pk}">' in page and "js/replica_logs.js" in page


# --- end to end: a real portal, a real agent, a real replica --------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_replicas_output_reaches_the_api_and_follows(tmp_path, artifact_root, operator,
                                                           join_secret):
    from knox.models import AuthToken

    portal = LivePortal(free_port(), artifact_root, HEARTBEAT_INTERVAL_S="1").start()
    agent = LiveAgent(portal.url, "node-logs", "9360-9379", tmp_path / "agent", join_secret)
    try:
        agent.start()
        model = factories.make_model(operator)
        factories.add_version(model, operator, factories.torchscript_file(tmp_path))
        _, token = AuthToken.objects.create(user=operator, expiry=None)
        api = httpx.Client(base_url=portal.url, headers={"Authorization": f"Token {token}"},
                           timeout=30)
        wait_until(lambda: Node.objects.filter(name="node-logs").exists(), 60, "the node")
        created = api.post("/api/deployments/", json={
            "name": "mlp", "model": model.name, "version": 1, "replicas": 1,
            "memory_bytes": 64 * 1024**2})
        assert created.status_code == 201, created.text
        replica = wait_until(lambda: Replica.objects.filter(
            deployment__name="mlp", state=ReplicaState.READY).first(), 120, "a ready replica")
        ready_s = time.monotonic()

        def texts(after: int | None = None) -> tuple[list[str], int]:
            query = {} if after is None else {"after": after}
            body = api.get(f"/api/replicas/{replica.pk}/logs/", params=query).json()
            return [line["text"] for line in body["lines"]], body["next"]
        wait_until(lambda: any("ready on port" in text for text in texts()[0]), 10,
                   "the replica's ready line in the API", interval_s=0.1)
        print(f"ready line in the API {time.monotonic() - ready_s:.2f} s after ready")
        row = api.get(f"/api/replicas/{replica.pk}/").json()
        assert row["uptime_s"] is not None and row["restarts"] == 0

        _, cursor = texts()
        assert api.post("/api/deployments/mlp/scale/", json={"replicas": 0}).status_code == 200
        wait_until(lambda: any("draining" in text for text in texts(cursor)[0]), 30,
                   "the drain line after the cursor", interval_s=0.2)
    finally:
        agent.terminate(timeout_s=40)
        portal.stop()
