"""Deployments: list, detail with live charts and events, and the controls."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from dashboards import events, queries
from dashboards.forms import PolicyForm, RollbackForm, ScaleForm, TrafficForm
from dashboards.views.common import form_errors, operator_action, run_action, viewer_page
from scaling import services as scaling
from serving import services
from serving.models import Deployment
from swarm_portal.errors import ServiceError

DETAIL = "dashboards:deployment-detail"
EVENTS_SHOWN = 50
REVISIONS_SHOWN = 20


@viewer_page
def deployment_list(request: HttpRequest) -> HttpResponse:
    rows = queries.deployment_rows()
    series = queries.deployment_series([row.id for row in rows])
    latest = queries.latest_figures(series)
    for row in rows:
        row.figures = latest.get(row.id, {})
    return render(request, "dashboards/deployments.html",
                  {"deployments": rows, "replica_map": queries.replica_deployments()})


@viewer_page
def deployment_detail(request: HttpRequest, name: str) -> HttpResponse:
    deployment = get_object_or_404(
        Deployment.objects.select_related("model", "version", "scaling_policy"), name=name)
    policy = queries._policy_or_none(deployment)
    series = queries.deployment_series([deployment.pk]).get(deployment.pk)
    context = {
        "deployment": deployment,
        "replicas": events.replica_rows([deployment.pk])[deployment.pk],
        "versions": list(deployment.model.versions.values_list("number", flat=True)),
        "revisions": deployment.revisions.select_related("created_by")[:REVISIONS_SHOWN],
        "scaling_events": deployment.scaling_events.all()[:EVENTS_SHOWN],
        "policy": policy,
        "series": series.to_dict() if series else {"t": []},
        "scale_form": ScaleForm(initial={"replicas": deployment.replicas}),
        "policy_form": PolicyForm.for_policy(policy),
        "traffic_text": ", ".join(f"{v}={w:g}" for v, w in deployment.traffic.items()),
    }
    return render(request, "dashboards/deployment_detail.html", context)


def _deployment(name: str) -> Deployment:
    return get_object_or_404(Deployment, name=name)


def _valid(form: ScaleForm | RollbackForm | TrafficForm | PolicyForm) -> None:
    if not form.is_valid():
        raise ServiceError(form_errors(form))


@operator_action
def deployment_scale(request: HttpRequest, name: str) -> HttpResponse:
    deployment = _deployment(name)

    def scale() -> str:
        form = ScaleForm(request.POST)
        _valid(form)
        replicas = form.cleaned_data["replicas"]
        services.do_scale_deployment(deployment, replicas, request.user)
        return f"{deployment.name} scaled to {replicas} replicas."
    return run_action(request, scale, DETAIL, name=name)


@operator_action
def deployment_traffic(request: HttpRequest, name: str) -> HttpResponse:
    deployment = _deployment(name)

    def set_weights() -> str:
        form = TrafficForm(request.POST)
        _valid(form)
        services.do_update_deployment(deployment, {"traffic": form.cleaned_data["traffic"]},
                                      request.user, reason="canary weights set")
        return f"Traffic of {deployment.name} set."
    return run_action(request, set_weights, DETAIL, name=name)


@operator_action
def deployment_rollback(request: HttpRequest, name: str) -> HttpResponse:
    deployment = _deployment(name)

    def roll_back() -> str:
        form = RollbackForm(request.POST)
        _valid(form)
        number = form.cleaned_data["revision"]
        services.do_rollback_deployment(deployment, number, request.user)
        return f"{deployment.name} rolled back to revision {number}."
    return run_action(request, roll_back, DETAIL, name=name)


@operator_action
def deployment_policy(request: HttpRequest, name: str) -> HttpResponse:
    deployment = _deployment(name)

    def set_policy() -> str:
        if request.POST.get("clear"):
            removed = scaling.do_clear_policy(deployment)
            return "Scaling policy removed." if removed else "There was no scaling policy."
        form = PolicyForm(request.POST)
        _valid(form)
        scaling.do_set_policy(deployment, **form.cleaned_data)
        return f"Scaling policy of {deployment.name} saved."
    return run_action(request, set_policy, DETAIL, name=name)
