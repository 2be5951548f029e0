"""In Chromium: the deployment page's logs panel shows a replica's output and follows it."""

from __future__ import annotations

import pytest

from swarm_protocol.agent_messages import ReplicaStatus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
FOLLOW_TIMEOUT_MS = 5000  # the panel polls every second; the margin is for a busy CI box


def test_the_logs_panel_shows_output_as_text_and_follows_it(
        log_in, send_heartbeat, viewer, gpu_node, served_deployment, screenshot):
    replica = served_deployment.replica_set.get()
    hostile = '<img src=x onerror="window.pwned=1">'
    send_heartbeat(gpu_node, 10.0, [ReplicaStatus(
        replica_id=replica.pk, state="ready", port=9100,
        log_lines=["model loaded", hostile, "\x1b[31mred\x1b[0m"])])
    page = log_in("victor")  # a viewer reads logs too
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto("/deployments/mlp/")
    assert page.locator("#replica-logs-replica option").count() == 1
    page.wait_for_function("document.getElementById('replica-logs-text').textContent"
                           ".includes('model loaded')", timeout=FOLLOW_TIMEOUT_MS)
    text = page.locator("#replica-logs-text")
    assert text.text_content() == f"model loaded\n{hostile}\n\\x1b[31mred\\x1b[0m"
    assert text.locator("img").count() == 0 and page.evaluate("window.pwned") is None

    send_heartbeat(gpu_node, 10.0, [ReplicaStatus(replica_id=replica.pk, state="ready",
                                                     port=9100, log_lines=["one more"])])
    page.wait_for_function("document.getElementById('replica-logs-text').textContent"
                           ".endsWith('one more')", timeout=FOLLOW_TIMEOUT_MS)
    screenshot(page, "followed")
    assert errors == []
