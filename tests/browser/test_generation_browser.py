"""In Chromium (issue 14): a generative deployment's Generation panel follows heartbeats live.

Screenshots go to $SWARM_TEST_ARTEFACTS (else var/test-artifacts/generation).
"""

from __future__ import annotations

import pytest

from registry.demo_lm import cached_tiny_lm_archive
from serving import services
from serving.models import Replica
from swarm_protocol.agent_messages import ReplicaStatus
from swarm_protocol.archive_hf import TEXT_SIGNATURE
from tests import factories

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
LIVE_TIMEOUT_MS = 5000


def test_the_generation_panel_shows_heartbeat_figures_without_a_reload(
        log_in, send_heartbeat, viewer, operator, model, gpu_node, tmp_path, screenshot):
    archive = cached_tiny_lm_archive(tmp_path / "tiny-lm")
    factories.add_version(model, operator, archive, signature=TEXT_SIGNATURE)
    services.do_create_deployment(name="chat", model=model, version_number=1, alias_name="",
                                  user=operator, replicas=2, memory_bytes=1024**2)
    page = log_in("victor")
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto("/deployments/chat/")
    total = page.locator("#generation-total")
    assert total.locator('[data-field="tokens_per_s"]').inner_text() == "\u2013"
    page.wait_for_selector('#live-badge[data-state="live"]', timeout=10_000)
    page.evaluate("window.notReloaded = true")

    first, second = sorted(Replica.objects.values_list("pk", flat=True))
    send_heartbeat(gpu_node, 50.0, [
        ReplicaStatus(replica_id=first, state="ready", port=9200, running_sequences=3,
                      waiting_sequences=1, kv_cache_usage=0.25, tokens_per_s=120.0,
                      ttft_p50_ms=20.0, ttft_p99_ms=80.0, itl_p50_ms=4.0, itl_p99_ms=9.0,
                      queue_p50_ms=2.0),
        ReplicaStatus(replica_id=second, state="ready", port=9201, running_sequences=5,
                      waiting_sequences=2, kv_cache_usage=0.75, tokens_per_s=30.5,
                      ttft_p50_ms=40.0, ttft_p99_ms=300.0)])
    page.wait_for_function(
        "document.querySelector('#generation-total [data-field=\"tokens_per_s\"]')"
        ".textContent === '150.5'", timeout=LIVE_TIMEOUT_MS)
    # The replicas turning ready rebuilds the rows (replicas.changed): figures are kept.
    page.wait_for_function("document.querySelectorAll('#replicas td.state.ready').length === 2",
                           timeout=LIVE_TIMEOUT_MS)
    row = page.locator(f'#generation-replicas tr[data-replica="{second}"]')
    assert row.locator('[data-field="running_sequences"]').inner_text() == "5"
    assert row.locator('[data-field="kv_cache_usage"]').inner_text() == "75%"
    assert row.locator('[data-field="itl_p50_ms"]').inner_text() == "\u2013"  # not reported
    texts = {name: total.locator(f'[data-field="{name}"]').inner_text() for name in (
        "running_sequences", "waiting_sequences", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
        "kv_cache_usage")}
    assert texts == {"running_sequences": "8", "waiting_sequences": "3", "ttft_p50_ms": "30.0",
                     "ttft_p99_ms": "300.0", "itl_p50_ms": "4.0", "kv_cache_usage": "50%"}
    assert page.evaluate("window.notReloaded") is True
    assert errors == []
    screenshot(page, "generation")
