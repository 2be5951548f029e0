"""Dashboard pages: what each role sees, the controls, refusals as messages, never a 500."""

from __future__ import annotations

import pytest

from serving import services
from serving.models import ApiKey, Deployment, JoinToken, Replica
from swarm_protocol.agent_messages import HeartbeatRequest, ReplicaStatus
from tests.dashboards_helpers import gpu

pytestmark = pytest.mark.django_db(transaction=True)
PAGES = ("/overview/", "/fleet/", "/deployments/", "/deployments/mlp/", "/access/",
         "/playground/")
CONTROLS = (b'id="scale-form"', b'id="traffic-form"', b'id="rollback-form"',
            b'id="key-form"', b'id="token-form"', b"Save policy")


@pytest.fixture
def viewer_client(client, viewer):
    client.force_login(viewer)
    return client


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


def page_text(client, url: str) -> bytes:
    response = client.get(url)
    assert response.status_code == 200, url
    return response.content


def test_anonymous_users_are_sent_to_the_login_page(client):
    for url in (*PAGES, "/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), url


def test_a_viewer_sees_every_page_without_controls(viewer_client, served_deployment):
    seen = b"".join(page_text(viewer_client, url) for url in PAGES)
    for control in CONTROLS:
        assert control not in seen, control
    assert b"gpu-a" in seen and b"mlp" in seen
    assert b"/static/vendor/uplot/uPlot.iife.min.js" in seen
    assert b"http://" not in seen.replace(b"http://testserver", b"")  # no CDN, nothing remote


def test_an_operator_sees_the_controls(operator_client, served_deployment):
    seen = page_text(operator_client, "/deployments/mlp/") + page_text(operator_client,
                                                                        "/access/")
    for control in CONTROLS:
        assert control in seen, control
    assert b"csrfmiddlewaretoken" in seen


def test_a_viewer_gets_403_on_every_control(viewer_client, served_deployment, operator):
    key, _ = services.do_create_api_key(name="k", user=operator, deployments=None,
                                        expires_in=None, rate_limit_rps=None)
    token = JoinToken.objects.first()
    posts = {
        "/deployments/mlp/scale/": {"replicas": 3},
        "/deployments/mlp/traffic/": {"traffic": "1=100"},
        "/deployments/mlp/rollback/": {"revision": 1},
        "/deployments/mlp/policy/": {"min_replicas": 1, "max_replicas": 2},
        "/access/keys/": {"name": "x"},
        f"/access/keys/{key.pk}/revoke/": {},
        "/access/tokens/": {"name": "x"},
        f"/access/tokens/{token.pk}/revoke/": {},
    }
    for url, data in posts.items():
        assert viewer_client.post(url, data).status_code == 403, url
    assert Deployment.objects.get().replicas == 1
    assert ApiKey.objects.count() == 1 and JoinToken.objects.count() == 1
    assert not ApiKey.objects.filter(revoked_at__isnull=False).exists()


def test_an_operator_scales_a_deployment(operator_client, served_deployment):
    response = operator_client.post("/deployments/mlp/scale/", {"replicas": 2}, follow=True)
    assert b"mlp scaled to 2 replicas." in response.content
    assert Deployment.objects.get().replicas == 2
    assert Replica.objects.filter(deployment=served_deployment, desired=True).count() == 2
    assert response.content.count(b"data-replica=") == 2


@pytest.mark.parametrize(("url", "data", "message"), [
    ("/deployments/mlp/scale/", {"replicas": "many"}, b"replicas: Enter a whole number."),
    ("/deployments/mlp/scale/", {"replicas": 999}, b"replicas: Ensure this value"),
    ("/deployments/mlp/traffic/", {"traffic": "1=lots"}, b"is not version=weight"),
    ("/deployments/mlp/traffic/", {"traffic": "7=100"}, b"has no version 7"),
    ("/deployments/mlp/rollback/", {"revision": 42}, b"mlp has no revision 42"),
    ("/deployments/mlp/policy/", {"min_replicas": 5, "max_replicas": 2,
                                   "target_in_flight_per_replica": 8, "stable_window_s": 60,
                                   "panic_window_s": 6, "scale_down_delay_s": 30,
                                   "idle_before_zero_s": 300}, b"max_replicas"),
])
def test_bad_input_is_a_message_not_a_500(operator_client, served_deployment, url, data,
                                          message):
    response = operator_client.post(url, data, follow=True)
    assert response.status_code == 200
    assert b'class="flash error"' in response.content
    assert message in response.content, response.content.decode()[:3000]
    assert Deployment.objects.get().replicas == 1


def test_a_policy_is_saved_shown_and_removed(operator_client, served_deployment):
    data = {"enabled": "on", "min_replicas": 1, "max_replicas": 3,
            "target_in_flight_per_replica": 4, "stable_window_s": 30, "panic_window_s": 3,
            "scale_down_delay_s": 10, "idle_before_zero_s": 300}
    response = operator_client.post("/deployments/mlp/policy/", data, follow=True)
    assert b"Scaling policy of mlp saved." in response.content
    assert b"1..3 replicas" in response.content
    served_deployment.refresh_from_db()
    assert served_deployment.scaling_policy.target_in_flight_per_replica == 4
    response = operator_client.post("/deployments/mlp/policy/", {"clear": "1"}, follow=True)
    assert b"Scaling policy removed." in response.content


def test_traffic_and_rollback_through_the_page(operator_client, served_deployment, model,
                                               operator, model_files):
    from tests.factories import add_version

    add_version(model, operator, model_files["torchscript_b"])
    response = operator_client.post("/deployments/mlp/traffic/", {"traffic": "1=90, 2=10"},
                                    follow=True)
    assert b"Traffic of mlp set." in response.content
    assert Deployment.objects.get().traffic == {"1": 90.0, "2": 10.0}
    response = operator_client.post("/deployments/mlp/rollback/", {"revision": 1}, follow=True)
    assert b"rolled back to revision 1" in response.content
    assert Deployment.objects.get().traffic == {}


def test_a_new_api_key_is_shown_once_and_can_be_revoked(operator_client, served_deployment):
    response = operator_client.post("/access/keys/", {"name": "ci", "deployments": "mlp",
                                                      "burst": 0})
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    key = ApiKey.objects.get()
    secret = response.content.split(b'<pre class="copy" id="secret">')[1].split(b"<")[0]
    assert secret.startswith(b"swk_") and secret.decode() not in key.key_hash
    assert secret not in page_text(operator_client, "/access/")  # once
    assert list(key.deployments.values_list("name", flat=True)) == ["mlp"]
    response = operator_client.post(f"/access/keys/{key.pk}/revoke/", follow=True)
    assert b"revoked" in response.content
    key.refresh_from_db()
    assert key.revoked_at is not None
    unknown = operator_client.post("/access/keys/", {"name": "x", "deployments": "nope"},
                                   follow=True)
    assert b"no deployment named &#x27;nope&#x27;" in unknown.content


def test_a_join_token_comes_with_the_join_command(operator_client):
    response = operator_client.post("/access/tokens/", {"name": "lab", "uses": 2})
    secret = response.content.split(b'<pre class="copy" id="secret">')[1].split(b"<")[0]
    assert secret.startswith(b"swj_")
    command = b"SWARM_JOIN_TOKEN=" + secret + b" swarm-worker --portal http://testserver"
    assert command in response.content
    assert b"--token " not in response.content
    assert JoinToken.objects.get().uses_left == 2
    bad = operator_client.post("/access/tokens/", {"name": "", "uses": 0}, follow=True)
    assert b'class="flash error"' in bad.content


def test_pages_show_the_latest_heartbeat_figures(viewer_client, gpu_node, served_deployment):
    replica = Replica.objects.get()
    services.do_heartbeat(gpu_node, HeartbeatRequest(
        devices=[gpu(util=77.0)],
        replicas=[ReplicaStatus(replica_id=replica.pk, state="ready", port=9100)]))
    fleet = page_text(viewer_client, "/fleet/")
    assert b'<td class="util">77%</td>' in fleet
    overview = page_text(viewer_client, "/overview/")
    assert b'id="tile-util" data-kind="gpu">77%' in overview
    assert b'id="tile-active">1 <small class="muted">of 1 ready<' in overview
    detail = page_text(viewer_client, "/deployments/mlp/")
    assert b'class="state ready"' in detail


def test_the_playground_offers_an_example_request(viewer_client, served_deployment):
    page = page_text(viewer_client, "/playground/?deployment=mlp")
    assert b'<option value="mlp" selected>' in page
    assert b"features" in page and b"js/playground.js" in page


def test_the_home_page_is_the_overview(viewer_client):
    assert viewer_client.get("/")["Location"] == "/overview/"


def test_the_upload_form_works_with_csrf_checks_on(operator, model, model_files, store):
    """Browsers send the CSRF token in the body: the check must not break the streaming."""
    import json

    from django.test import Client

    from registry.models import ModelVersion
    from tests.factories import SIGNATURE

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(operator)
    form = browser.get(f"/models/{model.name}/upload/")
    token = form.cookies["csrftoken"].value
    path = model_files["torchscript"]
    data = {"signature": json.dumps(SIGNATURE), "metadata": "", "format": ""}
    with path.open("rb") as artifact:
        refused = browser.post(f"/models/{model.name}/upload/", {**data, "artifact": artifact})
    assert refused.status_code == 403
    assert store.staging_names() == set()
    with path.open("rb") as artifact:
        accepted = browser.post(f"/models/{model.name}/upload/",
                                {**data, "artifact": artifact, "csrfmiddlewaretoken": token},
                                HTTP_ACCEPT="application/json")
    assert accepted.status_code == 201, accepted.content
    assert ModelVersion.objects.get().number == 1
    assert store.staging_names() == set()
