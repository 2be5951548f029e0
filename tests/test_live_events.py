"""The walls between the apps: live events and the activator are injected, never imported.

serving/ does not name dashboards/: it publishes live events through swarm_portal.live_events
(the dashboards subscribe in their AppConfig.ready()), and it asks for cold starts through
swarm_portal.activation (the scaling app registers its Celery task), not by task name.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from django.test import Client

from dashboards import events as dashboard_events
from scaling import tasks as scaling_tasks
from serving.gateway_api import issue_gateway_token
from swarm_portal import activation, live_events
from swarm_portal.live_events import NodeStatusChanged, ReplicasChanged

REPO_ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Return every module a file imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def importers(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    """Return the files under `folder` that import a module of the `forbidden` packages."""
    return sorted(
        str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / folder).rglob("*.py")
        if any(name.split(".")[0] in forbidden for name in imported_modules(path)))


def test_serving_imports_neither_the_dashboards_nor_the_auto_scaler() -> None:
    assert importers("serving", ("dashboards",)) == []
    # The one known exception: scaling by hand pauses the deployment's scaling policy.
    assert importers("serving", ("scaling",)) == ["serving/services/deployments.py"]


def test_scaling_does_not_import_the_dashboards() -> None:
    assert importers("scaling", ("dashboards",)) == []


def test_the_shared_protocol_imports_no_portal_package() -> None:
    portal = ("django", "rest_framework", "channels", "celery", "registry", "serving",
              "scaling", "dashboards", "swarm_portal", "swarm_cli")
    assert importers("swarm_protocol", portal) == []


@pytest.fixture
def received() -> list[live_events.LiveEvent]:
    events: list[live_events.LiveEvent] = []
    live_events.subscribe(events.append)
    yield events
    live_events.unsubscribe(events.append)


def test_every_subscriber_gets_each_event_once(received) -> None:
    live_events.subscribe(received.append)  # twice: still delivered once

    live_events.publish(NodeStatusChanged(7, "offline", "gpu-7"))

    assert received == [NodeStatusChanged(7, "offline", "gpu-7")]


def test_a_failing_subscriber_neither_raises_nor_starves_the_others(received, caplog) -> None:
    def broken(event: live_events.LiveEvent) -> None:
        raise RuntimeError("the dashboards are down")

    live_events.subscribe(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="swarm_portal.live_events"):
            live_events.publish(ReplicasChanged((3, 4)))
    finally:
        live_events.unsubscribe(broken)

    assert ReplicasChanged((3, 4)) in received
    assert "the dashboards are down" in caplog.text


def test_the_dashboards_and_the_auto_scaler_register_at_start() -> None:
    assert dashboard_events.on_live_event in live_events._subscribers
    assert activation._registered == [scaling_tasks.send_activation]


@pytest.mark.django_db
def test_without_an_auto_scaler_an_activation_is_a_503(monkeypatch) -> None:
    monkeypatch.setattr(activation, "_registered", [])
    gateway = Client(headers={"Authorization": f"Bearer {issue_gateway_token('edge-1')[1]}"})

    response = gateway.post("/api/gateway/activations", {"deployment_id": 7, "held": 3},
                            content_type="application/json")

    assert response.status_code == 503
    assert response.json()["error"].startswith("the auto-scaler is unavailable")
    assert response["Retry-After"]


@pytest.mark.django_db
def test_an_activation_calls_the_registered_activator(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(activation, "_registered", [])
    activation.register(lambda deployment_id, held: calls.append((deployment_id, held)))
    gateway = Client(headers={"Authorization": f"Bearer {issue_gateway_token('edge-1')[1]}"})

    response = gateway.post("/api/gateway/activations", {"deployment_id": 7, "held": 3},
                            content_type="application/json")

    assert response.status_code == 202
    assert calls == [(7, 3)]
