"""In Chromium (issue 15): the fleet page lists each node's replicas and drains a node only
after the operator confirms.

Screenshots go to $SWARM_TEST_ARTEFACTS (else var/test-artifacts/fleet); the folder is printed.
"""

from __future__ import annotations

import pytest

from serving.models import Node, NodeStatus, Replica

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_drain_asks_first_and_then_drains(log_in, served_deployment, screenshot):
    replica = Replica.objects.get()
    Replica.objects.filter(pk=replica.pk).update(port=41234, state="ready")
    page = log_in("olga")
    page.goto("/fleet/")
    row = page.locator(f'tr[data-replica="{replica.pk}"]')
    assert "mlp" in row.inner_text() and "41234" in row.inner_text()
    screenshot(page, "before")
    questions: list[str] = []

    def answer(accept: bool) -> None:
        page.once("dialog", lambda d: (questions.append(d.message),
                                       d.accept() if accept else d.dismiss()))
    answer(False)
    page.click(".drain-form button")
    assert questions and questions[0].startswith("Drain node gpu-a?")
    assert Node.objects.get().status == NodeStatus.READY  # dismissed: nothing sent
    answer(True)
    page.click(".drain-form button")
    page.wait_for_selector("text=gpu-a is draining")
    assert Node.objects.get().status == NodeStatus.DRAINING
    assert page.locator(".drain-form").count() == 0
    screenshot(page, "drained")


def test_a_viewer_sees_replicas_but_no_drain_button(log_in, viewer, served_deployment,
                                                     screenshot):
    page = log_in("victor")
    page.goto("/fleet/")
    assert page.locator("tr[data-replica]").count() == 1
    assert page.locator(".drain-form").count() == 0
    screenshot(page, "viewer")


def test_memory_by_process_shows_under_each_gpu(log_in, viewer, served_deployment,
                                                screenshot):
    from serving import services
    from swarm_protocol.agent_messages import DeviceProcess, HeartbeatRequest, ReplicaStatus
    from tests.dashboards_helpers import gpu

    replica = Replica.objects.get()
    device = gpu(used_gib=5.5)
    device.processes = [DeviceProcess(4242, 4 * 1024**3, replica.pk),
                        DeviceProcess(777, 1024**3 + 1024**3 // 2)]
    services.do_heartbeat(replica.node, HeartbeatRequest(devices=[device], replicas=[
        ReplicaStatus(replica_id=replica.pk, state="ready", port=41234)]))
    page = log_in("victor")
    page.goto("/fleet/")
    processes = page.locator('tr[data-gpu-processes="0"]')
    assert f"replica #{replica.pk} · mlp 4.0 GiB" in processes.inner_text()
    assert "pid 777 (not a replica) 1.5 GiB" in processes.inner_text()
    screenshot(page, "gpu-processes")
