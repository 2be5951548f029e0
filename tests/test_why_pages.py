"""Pages and APIs that say why (issue 15): pending reasons, unfit demand, health, scaling."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from dashboards import figures, queries
from dashboards.diffs import TIMES, spec_changes, split_text
from dashboards.health import BAD, OK, WARN, Health, ReplicaFacts, deployment_health
from registry.models import Model as RegistryModel
from registry.models import ModelVersion
from scaling import services as scaling
from scaling.models import ScalingPolicy
from scaling.node_services import tick_nodes
from scaling.nodeplan import NodeBounds, fits_a_new_node
from serving import services
from serving.models import Deployment, JoinToken, Node, Replica, ReplicaState
from serving.placement import DeviceRoom, NodeView, ReplicaNeed, format_bytes, unplaced_reason
from swarm_protocol.agent_messages import DeviceInfo, HeartbeatRequest, RegisterRequest
from tests import factories
from tests.dashboards_helpers import gpu, register_node
from tests.test_scaling_providers import RecordingProvider

GIB = 1024**3


def cpu_device(memory_gib: int = 16) -> DeviceInfo:
    return DeviceInfo(index=0, kind="cpu", name="cpu", uuid="cpu-0",
                      memory_total_bytes=memory_gib * GIB, memory_used_bytes=0,
                      utilization_pct=40.0)


def register_cpu_node(join_secret: str, name: str) -> Node:
    reply = services.do_register_node(RegisterRequest(
        join_token=join_secret, name=name, address="127.0.0.1", cost_per_hour=0.0,
        devices=[cpu_device()]))
    return Node.objects.get(pk=reply.node_id)


def deploy(model, operator, model_files, **settings_):
    factories.add_version(model, operator, model_files["torchscript"])
    return services.do_create_deployment(name="mlp", model=model, version_number=1,
                                         alias_name="", user=operator, **settings_)


# -- placement says why (pure) --------------------------------------------------------

def gpu_view(node_id: int, free_gib: float, total_gib: float = 80) -> NodeView:
    return NodeView(node_id, 1.0, (DeviceRoom(0, "gpu", int(free_gib * GIB),
                                              int(total_gib * GIB)),))


def test_the_reason_names_what_is_missing():
    need = ReplicaNeed(900 * GIB, "auto")
    assert unplaced_reason([], need) == "no ready node in the pool"
    cpu_only = [NodeView(1, 0.0, (DeviceRoom(0, "cpu", 16 * GIB, 16 * GIB),))]
    assert unplaced_reason(cpu_only, ReplicaNeed(GIB, "gpu")) == "no GPU in the pool"
    assert unplaced_reason([gpu_view(1, 80)], need) == (
        "no node has 900 GiB of memory on one device: the largest has 80 GiB")
    full = unplaced_reason([gpu_view(1, 3), gpu_view(2, 5)], ReplicaNeed(20 * GIB, "auto"))
    assert full.startswith("no node has 20 GiB free (the roomiest device has 5.0 GiB free)")


def test_byte_counts_read_like_people_write_them():
    assert [format_bytes(n) for n in (0, 512, 1536, 900 * GIB, 3 * 1024 * GIB)] == [
        "0 bytes", "512 bytes", "1.5 KiB", "900 GiB", "3.0 TiB"]


def test_a_replica_that_fits_no_kind_of_node_starts_none():
    cpu_nodes = [[("cpu", 16 * GIB)]]
    assert fits_a_new_node(cpu_nodes, 8 * GIB, "auto")
    assert not fits_a_new_node(cpu_nodes, 900 * GIB, "auto")
    assert not fits_a_new_node(cpu_nodes, GIB, "gpu")
    assert fits_a_new_node([[("cpu", 16 * GIB)], [("gpu", 80 * GIB)]], GIB, "gpu")
    assert fits_a_new_node([], 900 * GIB, "auto")  # nothing known yet: the first node tells


# -- the reason on the row, in the API, as an event -----------------------------------

@pytest.mark.django_db
def test_a_pending_replica_says_why_on_its_row_in_the_api_and_as_an_event(
        operator, operator_api, model, model_files, join_secret):
    register_node(join_secret, "gpu-a")  # one 80 GiB GPU
    deploy(model, operator, model_files, replicas=1, memory_bytes=900 * GIB)
    replica = Replica.objects.get()
    assert replica.state == ReplicaState.PENDING
    assert replica.error == "no node has 900 GiB of memory on one device: the largest has 80 GiB"

    body = operator_api.get("/api/replicas/?deployment=mlp").json()
    rows = body["results"] if isinstance(body, dict) else body
    assert rows[0]["error"] == replica.error

    texts = [event.text for event in queries.recent_events()]
    assert f"mlp replica #{replica.pk} is pending: {replica.error}" in texts


@pytest.mark.django_db
def test_the_reason_follows_the_pool(operator, model, model_files, join_secret, client):
    deploy(model, operator, model_files, replicas=1, memory_bytes=GIB, device="gpu")
    assert Replica.objects.get().error == "no ready node in the pool"
    register_cpu_node(join_secret, "cpu-a")
    services.reconcile_all()
    replica = Replica.objects.get()
    assert (replica.state, replica.error) == (ReplicaState.PENDING, "no GPU in the pool")

    client.force_login(operator)
    page = client.get(reverse("dashboards:deployment-detail", args=["mlp"])).content.decode()
    assert '<td class="why" data-field="why">no GPU in the pool</td>' in page

    register_node(join_secret, "gpu-a")
    services.reconcile_all()
    placed = Replica.objects.get()
    assert (placed.state, placed.error) == (ReplicaState.STARTING, "")


@pytest.mark.django_db
def test_demand_that_fits_no_kind_of_node_starts_no_node(operator, model, model_files,
                                                        join_secret):
    register_cpu_node(join_secret, "local-1")  # what the local provider starts: 16 GiB CPU
    deploy(model, operator, model_files, replicas=2, memory_bytes=900 * GIB)
    provider = RecordingProvider({"local-1"}, NodeBounds(min_nodes=0, max_nodes=3,
                                                         idle_release_s=60.0))
    plan = tick_nodes(provider=provider)
    assert provider.started == []
    assert plan.add == 0
    assert "2 pending replicas fit no kind of node here: no node started for them" in plan.reason


@pytest.mark.django_db
def test_demand_that_fits_still_starts_a_node_beside_demand_that_does_not(
        operator, model, model_files, join_secret):
    register_cpu_node(join_secret, "local-1")
    deploy(model, operator, model_files, replicas=2, memory_bytes=12 * GIB)  # one per node
    services.do_create_deployment(name="huge", model=model, version_number=1, alias_name="",
                                  user=operator, replicas=1, memory_bytes=900 * GIB)
    provider = RecordingProvider({"local-1"}, NodeBounds(0, 3, 60.0))
    plan = tick_nodes(provider=provider)
    assert provider.started == [1]
    assert "1 pending replicas fit no kind of node here" in plan.reason


# -- the deployments list marks unhealthy deployments ---------------------------------

def test_health_is_bad_on_failures_or_errors_and_warns_on_long_pending():
    now_s = 10_000.0
    assert deployment_health(ReplicaFacts(), 0.0, now_s) == Health(OK)
    assert deployment_health(ReplicaFacts(), None, now_s) == Health(OK)
    fresh = ReplicaFacts(pending=1, pending_since_s=now_s - 5)
    assert deployment_health(fresh, None, now_s).level == OK  # placement is still trying
    stuck = ReplicaFacts(pending=2, pending_since_s=now_s - 300, pending_reason="no GPU in "
                         "the pool")
    assert deployment_health(stuck, None, now_s) == Health(
        WARN, ("2 pending for 5 min: no GPU in the pool",))
    erring = deployment_health(ReplicaFacts(), 0.2, now_s)
    assert erring == Health(BAD, ("errors 20.0% > 5%",))
    failed = deployment_health(ReplicaFacts(failed_recently=1), 0.01, now_s)
    assert failed.text == "1 failed in the last 10 min"


@pytest.mark.django_db
def test_the_list_colours_and_explains_unhealthy_rows(operator, model, model_files,
                                                      join_secret, client):
    register_cpu_node(join_secret, "cpu-a")
    deploy(model, operator, model_files, replicas=1, memory_bytes=900 * GIB)
    services.do_create_deployment(name="fine", model=model, version_number=1, alias_name="",
                                  user=operator, replicas=0)
    services.do_create_deployment(name="broken", model=model, version_number=1,
                                  alias_name="", user=operator, replicas=1, memory_bytes=GIB)
    Replica.objects.filter(deployment__name="broken").update(
        state=ReplicaState.FAILED, error="download failed: 503")
    Replica.objects.filter(deployment__name="mlp").update(
        state_changed_at=timezone.now() - timedelta(minutes=3))
    client.force_login(operator)
    page = client.get(reverse("dashboards:deployment-list")).content.decode()
    rows = {name: next(row for row in page.split("<tr ") if f'href="/deployments/{name}/"'
                       in row) for name in ("mlp", "fine", "broken")}
    assert 'class="health-warn"' in rows["mlp"]
    assert "1 pending for 3 min: no node has 900 GiB of memory on one device" in rows["mlp"]
    assert 'class="health-bad"' in rows["broken"]
    assert "1 failed in the last 10 min" in rows["broken"]
    assert 'class="health-ok"' in rows["fine"]


# -- scaling by hand under a policy pauses it, and says so ----------------------------

def set_policy(deployment, **fields):
    return scaling.do_set_policy(deployment, **{"min_replicas": 1, "max_replicas": 4,
                                                **fields})


@pytest.mark.django_db
def test_the_api_refuses_a_hand_scale_under_a_policy_unless_asked_to_pause_it(
        operator, operator_api, model, model_files):
    deployment = deploy(model, operator, model_files, replicas=1)
    set_policy(deployment)
    refused = operator_api.post("/api/deployments/mlp/scale/", {"replicas": 3}, format="json")
    assert refused.status_code == 409
    assert "pause it to scale by hand (pause_policy)" in refused.json()["error"]
    assert Deployment.objects.get().replicas == 1

    paused = operator_api.post("/api/deployments/mlp/scale/",
                               {"replicas": 3, "pause_policy": True}, format="json")
    assert paused.status_code == 200, paused.content
    assert paused.json()["replicas"] == 3
    assert not ScalingPolicy.objects.get().enabled
    assert deployment.revisions.first().reason == "scaled to 3 by hand (auto-scaler paused)"
    # Without a policy on, a hand scale needs no flag.
    again = operator_api.post("/api/deployments/mlp/scale/", {"replicas": 2}, format="json")
    assert again.status_code == 200


@pytest.mark.django_db
def test_the_scale_form_says_it_pauses_the_policy_and_does(operator, model, model_files,
                                                          client):
    deployment = deploy(model, operator, model_files, replicas=1)
    set_policy(deployment)
    client.force_login(operator)
    url = reverse("dashboards:deployment-detail", args=["mlp"])
    page = client.get(url).content.decode()
    assert "Scaling by hand <strong>pauses the auto-scaler</strong>" in page
    assert "Pause auto-scaler and scale</button>" in page

    done = client.post(reverse("dashboards:deployment-scale", args=["mlp"]),
                       {"replicas": 3, "pause_policy": "on"}, follow=True).content.decode()
    assert "mlp scaled to 3 replicas. The auto-scaler is paused" in done
    assert '<p id="policy-state">Policy: <strong>paused</strong>' in done
    assert "Pause auto-scaler and scale" not in done
    refused = client.post(reverse("dashboards:deployment-scale", args=["mlp"]),
                          {"replicas": 1}, follow=True)
    assert b"scaled to 1 replica." in refused.content  # paused: a plain scale is fine now


@pytest.mark.django_db
def test_a_plain_form_post_under_a_policy_is_refused_with_the_reason(operator, model,
                                                                     model_files, client):
    deployment = deploy(model, operator, model_files, replicas=1)
    set_policy(deployment)
    client.force_login(operator)
    page = client.post(reverse("dashboards:deployment-scale", args=["mlp"]),
                       {"replicas": 3}, follow=True).content.decode()
    assert "the auto-scaler sets the replica count of mlp (policy on, 1..4 replicas)" in page
    assert Deployment.objects.get().replicas == 1


@pytest.mark.django_db
def test_auto_scaler_changes_appear_in_the_revision_timeline(operator, model, model_files,
                                                             client):
    deployment = deploy(model, operator, model_files, replicas=0)
    set_policy(deployment, min_replicas=0, scale_to_zero=True)
    event = scaling.do_activate(deployment.pk, held=3, now_s=1_800_000_000.0)
    assert event is not None and event.to_replicas >= 1
    revision = deployment.revisions.first()
    assert revision.reason.startswith(f"auto-scaler: 0 → {event.to_replicas} replicas (")
    assert revision.spec["replicas"] == event.to_replicas
    client.force_login(operator)
    page = client.get(reverse("dashboards:deployment-detail", args=["mlp"])).content.decode()
    assert f"auto-scaler: 0 → {event.to_replicas} replicas" in page


# -- truthful labels: a CPU is labelled as a CPU, and the counts agree ----------------

def heartbeat(node: Node, *devices: DeviceInfo) -> None:
    services.do_heartbeat(node, HeartbeatRequest(devices=list(devices), replicas=[]))


@pytest.mark.django_db
def test_without_a_gpu_the_overview_shows_cpu_load_under_a_cpu_label(
        operator, model, model_files, join_secret, client):
    node = register_cpu_node(join_secret, "cpu-a")
    register_cpu_node(join_secret, "cpu-b")
    deploy(model, operator, model_files, replicas=1, memory_bytes=GIB)  # on one of them
    heartbeat(node, replace(cpu_device(), utilization_pct=93.0))
    client.force_login(operator)
    page = client.get(reverse("dashboards:overview")).content.decode()
    assert "GPU utilisation" not in page
    assert '<span class="label">CPU load</span>' in page
    assert 'data-kind="cpu">' in page
    assert "no GPU in the pool: mean over CPU devices" in page
    assert '1 <small class="muted">of 2 ready</small>' in page
    assert "2 joined · 0 GPUs · 2 CPU devices" in page
    assert "Active GPU servers" not in page


@pytest.mark.django_db
def test_gpu_utilisation_counts_gpus_only(join_secret, client, operator):
    node = register_node(join_secret, "gpu-a")
    cpu_node = register_cpu_node(join_secret, "cpu-a")
    heartbeat(node, gpu(util=20.0))
    heartbeat(cpu_node, replace(cpu_device(), utilization_pct=100.0))
    summary = queries.summary(queries.fleet_nodes(), {})
    assert (summary.gpus, summary.cpus) == (1, 1)
    assert (summary.mean_utilization_pct, summary.mean_cpu_load_pct) == (20.0, 100.0)
    client.force_login(operator)
    page = client.get(reverse("dashboards:overview")).content.decode()
    assert '<span class="label">GPU utilisation</span><span class="value" id="tile-util" ' \
           'data-kind="gpu">20%</span>' in page
    assert "CPU load 100%" in page
    fleet = client.get(reverse("dashboards:fleet")).content.decode()
    assert '<span class="chip">CPU 0</span>' in fleet
    assert '<span class="chip">GPU 0</span>' in fleet


def test_device_series_names_cpu_devices_as_cpus():
    samples = [[100.0, [[0, 50.0, 0, None, None]], []]]
    assert figures.device_series(samples, {0: "cpu"}).to_dict() == {"t": [100.0],
                                                                    "cpu0": [50.0]}
    assert figures.device_series(samples).to_dict() == {"t": [100.0], "gpu0": [50.0]}


# -- edges: error pages, navigation, dangerous buttons, token states, plurals ---------

@pytest.mark.django_db
def test_a_missing_page_is_a_styled_404_with_navigation_and_the_api_gets_json(
        operator, client, settings):
    settings.DEBUG = False
    client.force_login(operator)
    page = client.get("/deployments/no-such-thing/")
    assert page.status_code == 404
    html = page.content.decode()
    assert 'id="error-page"' in html and "Nothing here" in html
    assert '<nav aria-label="Main">' in html and 'href="/deployments/"' in html
    assert 'rel="icon"' in html
    api = client.get("/api/no-such-endpoint/")
    assert api.status_code == 404
    assert api.json() == {"error": "not found: /api/no-such-endpoint/"}


@pytest.mark.django_db
def test_a_refused_page_is_a_styled_403_that_says_why(viewer, client, settings, model):
    settings.DEBUG = False
    client.force_login(viewer)
    page = client.get(reverse("registry:version-upload", args=[model.name]))
    assert page.status_code == 403
    html = page.content.decode()
    assert 'id="error-page"' in html and "Not allowed" in html
    assert f"signed in as {viewer.username}" in html
    assert '<nav aria-label="Ways back">' in html


@pytest.mark.django_db
def test_the_current_page_is_marked_for_assistive_technology(operator, client):
    client.force_login(operator)
    html = client.get(reverse("dashboards:fleet")).content.decode()
    assert '<a href="/fleet/" aria-current="page">Fleet</a>' in html
    assert '<a href="/overview/">Overview</a>' in html


@pytest.mark.django_db
def test_revoke_and_roll_back_ask_first_and_look_dangerous(operator, client, model,
                                                           model_files):
    deploy(model, operator, model_files, replicas=1)
    services.do_create_api_key(name="ci", user=operator, deployments=[], expires_in=None,
                               rate_limit_rps=None, burst=0)
    client.force_login(operator)
    access = client.get(reverse("dashboards:access")).content.decode()
    assert 'data-confirm="Revoke API key ci (' in access
    assert '<button type="submit" class="danger small">Revoke</button>' in access
    detail = client.get(reverse("dashboards:deployment-detail", args=["mlp"])).content.decode()
    assert 'id="rollback-form" data-confirm="Roll mlp back?' in detail
    assert '<button type="submit" class="danger">Roll back</button>' in detail
    assert '</span> <span id="desired-noun">replica</span> desired' in detail


@pytest.mark.django_db
def test_token_states_are_true_and_show_their_last_use(operator, client, join_secret):
    expired, _ = services.do_create_join_token(name="old", user=operator,
                                               expires_in=timedelta(hours=1), uses=None)
    JoinToken.objects.filter(pk=expired.pk).update(expires_at=timezone.now()
                                                   - timedelta(minutes=1))
    _token, secret = services.do_create_join_token(name="once", user=operator,
                                                   expires_in=None, uses=1)
    register_cpu_node(secret, "cpu-a")
    client.force_login(operator)
    html = client.get(reverse("dashboards:access")).content.decode()
    rows = {name: next(row for row in html.split("<tr>") if f"<td>{name}</td>" in row)
            for name in ("old", "once", "test")}
    assert '<span class="state expired">expired</span>' in rows["old"]
    assert '<span class="state used-up">used up</span>' in rows["once"]
    assert '<span class="state valid">valid</span>' in rows["test"]
    assert timezone.localtime().strftime("%Y-%m-%d") in rows["once"].split("by")[1]
    assert "<td>never</td>" in rows["test"].split("by")[1]


# -- the registry at scale: search, sort and pages ------------------------------------

def many_models(owner, count: int = 200) -> None:
    RegistryModel.objects.bulk_create([
        RegistryModel(name=f"model-{i:03d}", owner=owner,
                      description="a resnet for images" if i % 10 == 0 else "text")
        for i in range(count)])


@pytest.mark.django_db
def test_the_models_page_searches_sorts_and_pages_200_models(operator, client):
    many_models(operator)
    client.force_login(operator)
    first = client.get(reverse("registry:model-list")).content.decode()
    assert first.count('<a href="/models/model-') == 25
    assert "200 models · page 1 of 8" in first
    assert 'href="?page=2" rel="next"' in first
    last = client.get(reverse("registry:model-list") + "?page=8").content.decode()
    assert "model-199" in last and 'rel="prev"' in last and 'rel="next"' not in last

    found = client.get(reverse("registry:model-list") + "?q=RESNET").content.decode()
    assert "20 models matching “RESNET”" in found
    assert found.count('<a href="/models/model-') == 20
    assert "model-001" not in found and "model-190" in found

    newest_first = client.get(reverse("registry:model-list") + "?sort=-name").content.decode()
    assert newest_first.index("model-199") < newest_first.index("model-198")
    assert '<th aria-sort="descending"><a href="?">Name</a></th>' in newest_first
    odd = client.get(reverse("registry:model-list") + "?sort=nonsense&page=999")
    assert odd.status_code == 200 and "page 8 of 8" in odd.content.decode()


# -- revisions as diffs, canary weights as an effective split -------------------------

def test_a_revision_shows_what_changed_not_a_dict():
    first = {"version": 1, "replicas": 1, "traffic": {}, "memory_bytes": GIB}
    second = {**first, "replicas": 3, "traffic": {"1": 9.0, "2": 1.0}}
    assert spec_changes(None, first) == [f"v1 {TIMES} 1"]
    assert spec_changes(first, second) == ["replicas: 1 → 3",
                                           "canary split: none → v1 90% · v2 10%"]
    assert spec_changes(second, second) == []
    assert split_text({"2": 1, "1": 3, "3": 0}) == "v1 75% · v2 25%"


@pytest.mark.django_db
def test_the_detail_page_shows_revision_diffs_and_the_effective_split(
        operator, model, model_files, client):
    deployment = deploy(model, operator, model_files, replicas=2)
    factories.add_version(model, operator, model_files["torchscript_b"])
    services.do_update_deployment(deployment, {"traffic": {"1": 3, "2": 1}}, operator,
                                  reason="canary weights set")
    client.force_login(operator)
    page = client.get(reverse("dashboards:deployment-detail", args=["mlp"])).content.decode()
    assert '<span class="change">canary split: none → v1 75% · v2 25%</span>' in page
    assert "{&#x27;1&#x27;" not in page and "{'1'" not in page
    assert ('<p id="effective-split">Now: v1 75% · v2 25% · replicas '
            f'v1 {TIMES} 2, v2 {TIMES} 1</p>') in page


@pytest.mark.django_db
def test_the_models_api_searches_sorts_and_refuses_what_it_cannot_do(operator, operator_api):
    many_models(operator)
    found = operator_api.get("/api/models/?search=resnet&sort=-name&limit=5").json()
    assert found["count"] == 20
    assert [m["name"] for m in found["results"]] == [f"model-{i}" for i in
                                                      (190, 180, 170, 160, 150)]
    by_name = operator_api.get("/api/models/?limit=2&offset=198").json()
    assert [m["name"] for m in by_name["results"]] == ["model-198", "model-199"]
    bad = operator_api.get("/api/models/?sort=size")
    assert bad.status_code == 400 and bad.json()["error"].startswith("sort must be one of name")
    long = operator_api.get("/api/models/?search=" + "x" * 101)
    assert long.status_code == 400 and "at most 100 characters" in long.json()["error"]


@pytest.mark.django_db
def test_a_version_shows_its_deployments_offers_deploy_and_download_and_reads_metadata(
        operator, model, model_files, client):
    deployment = deploy(model, operator, model_files, replicas=0)
    factories.add_version(model, operator, model_files["torchscript_b"])
    ModelVersion.objects.filter(number=2).update(
        metadata={"dataset": "imagenet", "metrics": {"top1": 0.71}})
    services.do_update_deployment(deployment, {"traffic": {"1": 9, "2": 1}}, operator)
    client.force_login(operator)
    page = client.get(reverse("registry:model-detail", args=[model.name])).content.decode()
    assert page.count('Served by: <a href="/deployments/mlp/">mlp</a>') == 2
    assert 'href="/api/models/mlp/versions/2/artifact" download>Download</a>' in page
    assert "<dt>dataset</dt><dd>imagenet</dd>" in page
    assert "<dt>metrics</dt><dd>{&quot;top1&quot;: 0.71}</dd>" in page
    assert "{&#x27;dataset&#x27;" not in page

    created = client.post(reverse("dashboards:deployment-create"), {
        "model": model.name, "version": 2, "name": "mlp-v2", "replicas": 0,
        "memory_gib": 1}, follow=True).content.decode()
    assert "mlp-v2 deploys mlp v2 with 0 replicas." in created
    assert Deployment.objects.get(name="mlp-v2").memory_bytes == GIB
    taken = client.post(reverse("dashboards:deployment-create"), {
        "model": model.name, "version": 2, "name": "mlp-v2", "replicas": 1,
        "memory_gib": 1}, follow=True).content.decode()
    assert "a deployment named &#x27;mlp-v2&#x27; already exists" in taken


# -- charts an SRE can trust ------------------------------------------------------------

def test_a_stretch_without_samples_makes_no_rate_and_no_error_rate_without_traffic():
    def at(t_s: float, completed: int, failed: int = 0) -> list:
        return [t_s, [[0, 50.0, 0, None, None]], [[7, completed, failed, 0, 2.0, 5.0]]]
    samples = [at(0, 0), at(5, 10), at(10, 20), at(310, 30), at(315, 40), at(320, 40)]
    series = figures.deployment_series({1: samples}, {7: 1}, 5.0)[1]
    # 10 → 310 spans five minutes without data: no point averaged over it.
    assert series.t_s == [5.0, 10.0, 315.0, 320.0]
    assert series.lines["rps"] == [2.0, 2.0, 2.0, 0.0]
    assert series.lines["error_rate"] == [0.0, 0.0, 0.0, None]  # no traffic: no rate
    fleet = figures.fleet_series({1: samples}, 5.0).to_dict()
    assert fleet["rps"] == [None, 2.0, 2.0, None, 2.0, 0.0]


def test_a_canary_gets_a_request_rate_per_version():
    def at(t_s: float, first: int, second: int) -> list:
        return [t_s, [], [[1, first, 0, 0, 2.0, 5.0], [2, second, 0, 0, 3.0, 6.0]]]
    samples = [at(0, 0, 0), at(5, 45, 5), at(10, 90, 10)]
    series = figures.deployment_series({1: samples}, {1: 9, 2: 9}, 5.0, {1: 1, 2: 2})[9]
    assert series.lines["rps"] == [10.0, 10.0]
    assert (series.lines["rps_v1"], series.lines["rps_v2"]) == ([9.0, 9.0], [1.0, 1.0])
    single = figures.deployment_series({1: samples}, {1: 9, 2: 9}, 5.0, {1: 1, 2: 1})[9]
    assert "rps_v1" not in single.lines  # one version: the total says it all
