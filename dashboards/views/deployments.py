"""Deployments: list, detail with live charts and events, and the controls."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from dashboards import diffs, events, generation, health, queries
from dashboards.forms import DeployForm, PolicyForm, RollbackForm, ScaleForm, TrafficForm
from dashboards.templatetags.dashboards import plural
from dashboards.views.common import form_errors, operator_action, run_action, viewer_page
from registry.models import Model, ModelFormat
from scaling import services as scaling
from serving import live, services
from serving.models import Deployment
from serving.services.reconcile import target_counts
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
                  {"deployments": queries.with_health(rows),
                   "replica_map": queries.replica_deployments(),
                   "error_rate_bad": health.ERROR_RATE_BAD})


@viewer_page
def deployment_detail(request: HttpRequest, name: str) -> HttpResponse:
    deployment = get_object_or_404(
        Deployment.objects.select_related("model", "version", "scaling_policy"), name=name)
    policy = queries._policy_or_none(deployment)
    replicas = events.replica_rows([deployment.pk])[deployment.pk]
    series = queries.deployment_series(
        [deployment.pk], {r["id"]: r["version"] for r in replicas}).get(deployment.pk)
    numbers = dict(deployment.model.versions.values_list("pk", "number"))
    context = {
        "deployment": deployment,
        "replicas": replicas,
        "versions": sorted(numbers.values()),
        "revisions": _with_changes(list(
            deployment.revisions.select_related("created_by")[:REVISIONS_SHOWN + 1])),
        "split": diffs.split_text(deployment.traffic),
        "targets": sorted((numbers[pk], count) for pk, count in
                          target_counts(deployment).items() if pk in numbers),
        "scaling_events": deployment.scaling_events.all()[:EVENTS_SHOWN],
        "policy": policy,
        "series": series.to_dict() if series else {"t": []},
        "scale_form": ScaleForm(initial={"replicas": deployment.replicas}),
        "policy_form": PolicyForm.for_policy(policy),
        "traffic_text": ", ".join(f"{v}={w:g}" for v, w in deployment.traffic.items()),
        "generation": _generation_panel(deployment, replicas),
    }
    return render(request, "dashboards/deployment_detail.html", context)


def _generation_panel(deployment: Deployment,
                      replicas: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the Generation panel's figures (None: the deployment is not generative).

    From the heartbeat cache, no query; while the cache is down every figure is unknown.
    """
    if deployment.version.format != ModelFormat.HF_CAUSAL_LM:
        return None
    try:
        entries = live.replica_entries({r["id"]: r["node_id"] for r in replicas
                                        if r["node_id"] is not None})
    except live.CacheUnavailable:
        entries = {}
    figures = [generation.replica_figures(entries.get(r["id"])) for r in replicas]
    return {"total": generation.deployment_figures(figures).as_text(),
            "rows": [{"id": r["id"], "node": r["node"], "figures": f.as_text()}
                     for r, f in zip(replicas, figures, strict=True)],
            # What the page's script sums with the heartbeats that follow.
            "seed": {r["id"]: asdict(f) for r, f in zip(replicas, figures, strict=True)}}


def _with_changes(revisions: list[Any]) -> list[Any]:
    """Give each revision (newest first) `.changes`: what it changed from the one before."""
    for newer, older in zip(revisions, [*revisions[1:], None], strict=False):
        newer.changes = diffs.spec_changes(older.spec if older else None, newer.spec)
    if len(revisions) > REVISIONS_SHOWN:  # the extra one was read only to diff against
        revisions = revisions[:REVISIONS_SHOWN]
    return revisions


def _policy_on(deployment: Deployment) -> bool:
    policy = queries._policy_or_none(deployment)
    return bool(policy and policy.enabled)


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
        replicas, pause = form.cleaned_data["replicas"], form.cleaned_data["pause_policy"]
        paused = pause and _policy_on(deployment)
        services.do_scale_deployment(deployment, replicas, request.user, pause_policy=pause)
        noun = plural(replicas, "replica")
        text = f"{deployment.name} scaled to {replicas} {noun}."
        return text + (" The auto-scaler is paused: turn it on again in the policy to let "
                       "it change the count." if paused else "")
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
        scaling.do_set_policy(deployment, **form.changes())
        return f"Scaling policy of {deployment.name} saved."
    return run_action(request, set_policy, DETAIL, name=name)


@operator_action
def deployment_create(request: HttpRequest) -> HttpResponse:
    """Deploy a version from its registry page; back there with the reason if refused."""
    form = DeployForm(request.POST)
    model = get_object_or_404(Model, name=request.POST.get("model", "")[:100])
    if not form.is_valid():
        messages.error(request, form_errors(form))
        return redirect("registry:model-detail", name=model.name)
    data = form.cleaned_data
    try:
        deployment = services.do_create_deployment(
            name=data["name"], model=model, version_number=data["version"], alias_name="",
            user=request.user, replicas=data["replicas"],
            memory_bytes=int(data["memory_gib"] * 1024**3))
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("registry:model-detail", name=model.name)
    messages.success(request, f"{deployment.name} deploys {model.name} v{data['version']} "
                              f"with {data['replicas']} {plural(data['replicas'], 'replica')}.")
    return redirect(DETAIL, name=deployment.name)
