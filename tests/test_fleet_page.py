"""The fleet page (issue 15): each node lists its replicas; operators can drain a node."""

from __future__ import annotations

import pytest

from serving.models import Node, NodeStatus, Replica

pytestmark = pytest.mark.django_db(transaction=True)


def fleet_html(client) -> str:
    response = client.get("/fleet/")
    assert response.status_code == 200
    return response.content.decode()


def test_each_node_lists_its_replicas(client, viewer, served_deployment):
    replica = Replica.objects.get()
    Replica.objects.filter(pk=replica.pk).update(port=41234, state="ready")
    client.force_login(viewer)
    html = fleet_html(client)
    row = html.split(f'data-replica="{replica.pk}"')[1].split("</tr>")[0]
    assert ">mlp</a>" in row and ">v1<" in row and 'class="state ready"' in row
    assert ">41234<" in row and ">GPU 0<" in row


def test_a_node_without_replicas_says_so(client, viewer, gpu_node):
    client.force_login(viewer)
    assert "No replicas on this node." in fleet_html(client)


def test_a_viewer_sees_no_drain_button_and_gets_403(client, viewer, served_deployment):
    client.force_login(viewer)
    assert "node-drain" not in fleet_html(client) and ">Drain<" not in fleet_html(client)
    node = Node.objects.get()
    assert client.post(f"/fleet/nodes/{node.pk}/drain/").status_code == 403
    node.refresh_from_db()
    assert node.status == NodeStatus.READY and Replica.objects.get().desired


def test_an_operator_drains_a_node_after_confirming(client, operator, served_deployment):
    client.force_login(operator)
    node = Node.objects.get()
    html = fleet_html(client)
    form = html.split('class="drain-form"')[1].split("</form>")[0]
    assert f'action="/fleet/nodes/{node.pk}/drain/"' in html
    assert 'data-confirm="Drain node gpu-a?' in form and 'class="danger small"' in form
    assert "csrfmiddlewaretoken" in form
    response = client.post(f"/fleet/nodes/{node.pk}/drain/", follow=True)
    assert response.status_code == 200 and b"gpu-a is draining" in response.content
    node.refresh_from_db()
    assert node.status == NodeStatus.DRAINING
    assert not Replica.objects.filter(node=node, desired=True).exists()
    assert b'class="drain-form"' not in response.content  # drained: no button again


def test_drain_needs_post_and_a_known_node(client, operator, gpu_node):
    client.force_login(operator)
    assert client.get(f"/fleet/nodes/{gpu_node.pk}/drain/").status_code == 405
    assert client.post("/fleet/nodes/999999/drain/").status_code == 404


def test_drain_checks_csrf(operator, gpu_node):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(operator)
    assert strict.post(f"/fleet/nodes/{gpu_node.pk}/drain/").status_code == 403
    gpu_node.refresh_from_db()
    assert gpu_node.status == NodeStatus.READY
