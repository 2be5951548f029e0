"""Generation figures, portal side: heartbeats keep them in the live cache (not the database)
and the deployment page shows them per replica and per deployment in a Generation panel."""

from __future__ import annotations

import json
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from dashboards.generation import GenerationFigures, deployment_figures, replica_figures
from registry.demo_lm import cached_tiny_lm_archive
from serving import live, services
from serving.models import Deployment, Node
from swarm_protocol.agent_messages import GENERATION_FIELDS, HeartbeatRequest, ReplicaStatus
from swarm_protocol.archive_hf import TEXT_SIGNATURE
from tests.dashboards_helpers import gpu
from tests.factories import add_version

pytestmark = pytest.mark.django_db(transaction=True)
FIGURES = [  # two replicas of one deployment, as their agent reports them
    {"running_sequences": 3, "waiting_sequences": 1, "kv_cache_usage": 0.25,
     "tokens_per_s": 120.0, "ttft_p50_ms": 20.0, "ttft_p99_ms": 80.0, "itl_p50_ms": 4.0,
     "itl_p99_ms": 9.0, "queue_p50_ms": 2.0},
    {"running_sequences": 5, "waiting_sequences": 2, "kv_cache_usage": 0.75,
     "tokens_per_s": 30.5, "ttft_p50_ms": 40.0, "ttft_p99_ms": 300.0, "itl_p50_ms": 6.0,
     "itl_p99_ms": 12.0, "queue_p50_ms": 8.0},
]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return cached_tiny_lm_archive(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture
def lm_deployment(gpu_node, model, operator, tiny_lm) -> Deployment:
    """`chat`: two replicas of the tiny LM (validated by the real upload path)."""
    version = add_version(model, operator, tiny_lm, signature=TEXT_SIGNATURE)
    assert version.format == "hf_causal_lm"
    return services.do_create_deployment(name="chat", model=model, version_number=version.number,
                                         alias_name="", user=operator, replicas=2,
                                         memory_bytes=1024**2)


def heartbeat(node: Node, figures: list[dict[str, object]]) -> list[int]:
    """Play the agent: every replica desired on the node is ready, with these figures."""
    desired = services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()],
                                                           replicas=[])).desired
    ids = sorted(d.replica_id for d in desired)
    services.do_heartbeat(node, HeartbeatRequest(devices=[gpu()], replicas=[
        ReplicaStatus(replica_id=pk, state="ready", port=9000 + i, **figures[i])
        for i, pk in enumerate(ids)]))
    return ids


def panel_text(html: str) -> str:
    section = re.search(r'<section id="generation".*?</section>', html, re.S)
    assert section, "no Generation panel"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", section.group(0)))


@pytest.mark.slow  # the tiny LM's upload is validated in a child process
def test_heartbeat_figures_reach_the_cache_and_the_deployment_page(
        client, viewer, gpu_node, lm_deployment):
    ids = heartbeat(gpu_node, FIGURES)
    assert len(ids) == 2
    cached = {r["replica_id"]: r for r in live.node_figures(gpu_node.pk)["replicas"]}
    assert cached[ids[0]]["tokens_per_s"] == 120.0 and cached[ids[1]]["waiting_sequences"] == 2

    client.force_login(viewer)
    html = client.get("/deployments/chat/").content.decode()
    text = panel_text(html)
    # The deployment: sequences and tokens add up; KV use and p50s are means; p99s the worst.
    assert "Tokens per second 150.5" in text
    assert "Sequences running / waiting 8 / 3" in text
    assert "Time to first token p50 / p99 30.0 / 300.0 ms" in text
    assert "Inter-token latency p50 / p99 5.0 / 12.0 ms" in text
    assert "Queue time p50 5.0 ms" in text
    assert "KV cache reserved 50%" in text
    # Each replica's row.
    assert f"#{ids[0]} gpu-a 3 1 25% 120.0 20.0 / 80.0 4.0 / 9.0 2.0" in text
    assert f"#{ids[1]} gpu-a 5 2 75% 30.5 40.0 / 300.0 6.0 / 12.0 8.0" in text
    seed = json.loads(re.search(r'id="generation-seed"[^>]*>(.*?)</script>', html).group(1))
    assert seed[str(ids[1])]["running_sequences"] == 5  # what the live script starts from
    assert "js/generation.js" in html


@pytest.mark.slow  # the tiny LM's upload is validated in a child process
def test_a_heartbeat_writes_no_row_for_its_generation_figures(gpu_node, lm_deployment):
    ids = heartbeat(gpu_node, FIGURES)  # the replicas become ready: that is written
    changed = [{**f, "tokens_per_s": 1.0, "running_sequences": 0} for f in FIGURES]
    with CaptureQueriesContext(connection) as queries:
        services.do_heartbeat(gpu_node, HeartbeatRequest(devices=[gpu()], replicas=[
            ReplicaStatus(replica_id=pk, state="ready", port=9000 + i, **changed[i])
            for i, pk in enumerate(ids)]))
    assert not [q["sql"] for q in queries.captured_queries
                if q["sql"].lstrip().upper().startswith(("INSERT", "DELETE"))]
    updates = [q["sql"] for q in queries.captured_queries
               if q["sql"].lstrip().upper().startswith("UPDATE")]
    assert not [sql for sql in updates if "replica" in sql.lower()]
    cached = {r["replica_id"]: r for r in live.node_figures(gpu_node.pk)["replicas"]}
    assert cached[ids[0]]["tokens_per_s"] == 1.0


@pytest.mark.slow  # the tiny LM's upload is validated in a child process
def test_replicas_without_generation_figures_keep_none_in_the_cache_and_show_dashes(
        client, viewer, gpu_node, lm_deployment):
    ids = heartbeat(gpu_node, [{}, {}])  # an older agent: no generation figures
    cached = live.node_figures(gpu_node.pk)["replicas"]
    assert not [name for status in cached for name in GENERATION_FIELDS if name in status]
    client.force_login(viewer)
    text = panel_text(client.get("/deployments/chat/").content.decode())
    assert "Tokens per second \u2013" in text
    assert f"#{ids[0]} gpu-a \u2013 \u2013 \u2013" in text


def test_a_deployment_that_is_not_generative_has_no_generation_panel(
        client, viewer, served_deployment):
    client.force_login(viewer)
    html = client.get("/deployments/mlp/").content.decode()
    assert 'id="generation"' not in html and "js/generation.js" not in html


def test_figures_from_the_cache_are_checked_again_and_summed():
    odd = replica_figures({"running_sequences": -2, "waiting_sequences": True,
                           "kv_cache_usage": 3.0, "tokens_per_s": "fast",
                           "ttft_p50_ms": float("nan")})
    assert odd == GenerationFigures(kv_cache_usage=1.0)
    total = deployment_figures([replica_figures(f) for f in FIGURES] + [GenerationFigures()])
    assert (total.running_sequences, total.waiting_sequences) == (8, 3)
    assert total.tokens_per_s == 150.5 and total.kv_cache_usage == 0.5
    assert (total.ttft_p99_ms, total.itl_p99_ms) == (300.0, 12.0)
    assert deployment_figures([]).as_text()["tokens_per_s"] == "\u2013"


def test_the_summing_module_is_pure():
    import subprocess
    import sys

    code = ("import sys, dashboards.generation, scaling.policy; "
            "print('django' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "False"
