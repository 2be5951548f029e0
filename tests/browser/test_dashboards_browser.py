"""In Chromium: log in, upload a model, watch the fleet live, scale, and a viewer's pages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serving.models import Replica
from swarm_protocol.agent_messages import ReplicaStatus
from tests.factories import SIGNATURE

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
LIVE_TIMEOUT_MS = 3000  # the issue asks for under a second; the margin is for a busy CI box


def wait_live(page: Any) -> None:
    page.wait_for_selector('#live-badge[data-state="live"]', timeout=10_000)


def test_an_operator_uploads_a_model_through_the_form(log_in, operator, model_files,
                                                      screenshot):
    page = log_in("olga")
    page.goto("/models/new/")
    page.fill("input[name=name]", "browser-mlp")
    page.fill("textarea[name=description]", "made in a browser")
    page.click("main button[type=submit]")
    page.wait_for_url("**/models/browser-mlp/")
    page.click("text=Upload version")
    page.set_input_files("input[name=artifact]", str(model_files["torchscript"]))
    page.fill("textarea[name=signature]", json.dumps(SIGNATURE))
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/models/browser-mlp/", timeout=60_000)
    page.wait_for_selector("text=v1", timeout=10_000)
    screenshot(page, "uploaded")


def test_the_fleet_page_shows_a_heartbeat_without_a_reload(log_in, send_heartbeat, operator,
                                                           gpu_node, screenshot):
    page = log_in("olga")
    page.goto("/fleet/")
    wait_live(page)
    page.evaluate("window.notReloaded = true")
    util = page.locator(f'#node-{gpu_node.pk} tr[data-gpu="0"] .util')
    send_heartbeat(gpu_node, 88.0, [])
    page.wait_for_function(
        f"document.querySelector('#node-{gpu_node.pk} tr[data-gpu=\"0\"] .util')"
        ".textContent === '88%'", timeout=LIVE_TIMEOUT_MS)
    send_heartbeat(gpu_node, 12.0, [])
    page.wait_for_function(
        f"document.querySelector('#node-{gpu_node.pk} tr[data-gpu=\"0\"] .util')"
        ".textContent === '12%'", timeout=LIVE_TIMEOUT_MS)
    assert util.text_content() == "12%"
    assert page.evaluate("window.notReloaded") is True
    screenshot(page, "fleet")


def test_an_operator_scales_and_sees_replicas_change_live(
        log_in, send_heartbeat, operator, gpu_node, served_deployment, screenshot):
    page = log_in("olga")
    page.goto("/deployments/mlp/")
    assert page.locator("#replicas tr[data-replica]").count() == 1
    page.fill("#scale-form input[name=replicas]", "3")
    page.click("#scale-form button[type=submit]")
    page.wait_for_selector("text=mlp scaled to 3 replicas.")
    assert page.locator("#replicas tr[data-replica]").count() == 3
    wait_live(page)
    page.evaluate("window.notReloaded = true")
    statuses = [ReplicaStatus(replica_id=r.pk, state="ready", port=9100 + i, completed=10)
                for i, r in enumerate(Replica.objects.filter(node=gpu_node))]
    send_heartbeat(gpu_node, 50.0, statuses)
    page.wait_for_function(
        "document.querySelectorAll('#replicas td.state.ready').length === "
        f"{len(statuses)}", timeout=LIVE_TIMEOUT_MS)
    assert page.evaluate("window.notReloaded") is True
    screenshot(page, "scaled")


def test_a_viewer_sees_no_controls(log_in, viewer, served_deployment, screenshot):
    page = log_in("victor")
    for url in ("/deployments/mlp/", "/access/"):
        page.goto(url)
        for control in ("#scale-form", "#traffic-form", "#rollback-form", "#policy",
                        "#key-form", "#token-form"):
            assert page.locator(control).count() == 0, (url, control)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    for url in ("/overview/", "/fleet/", "/deployments/", "/deployments/mlp/"):
        page.goto(url)
        wait_live(page)  # viewers get live updates too
        screenshot(page, url.strip("/").replace("/", "-"))
    for url in ("/access/", "/playground/", "/models/"):
        page.goto(url)
    assert errors == []


def test_the_playground_calls_a_real_replica_and_shows_the_reply(
        log_in, portal, operator, model, model_files, tmp_path, screenshot):
    from serving import services
    from serving.models import Node
    from tests.e2e import LiveAgent
    from tests.factories import add_version
    from tests.waiting import wait_until

    _token, secret = services.do_create_join_token(name="pg", user=operator, expires_in=None,
                                                   uses=1)
    agent = LiveAgent(portal.url, "pg-node", "9340-9359", tmp_path / "agent", secret).start()
    try:
        wait_until(lambda: Node.objects.filter(name="pg-node").exists(), 60, "the agent")
        version = add_version(model, operator, model_files["torchscript"])
        services.do_create_deployment(name="mlp", model=model, version_number=version.number,
                                      alias_name="", user=operator, replicas=1)
        page = log_in("olga")
        page.goto("/deployments/mlp/")
        wait_live(page)
        # The agent starts the replica and reports it ready: the page learns it live.
        page.wait_for_function(
            "document.querySelectorAll('#replicas td.state.ready').length === 1",
            timeout=120_000)
        page.goto("/playground/?deployment=mlp")
        page.click("#pg-send")
        page.wait_for_selector("#pg-result:not([hidden])", timeout=30_000)
        assert page.text_content("#pg-status") == "200 OK"
        assert '"scores"' in page.text_content("#pg-response")
        assert float(page.text_content("#pg-latency")) > 0
        screenshot(page, "playground")
    finally:
        agent.terminate(timeout_s=40)
