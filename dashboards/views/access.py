"""Access: API keys for /v2 and join tokens for GPU servers; secrets are shown once."""

from __future__ import annotations

from datetime import timedelta

from django.contrib import messages
from django.db.models import Max
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from dashboards.forms import ApiKeyForm, JoinTokenForm
from dashboards.views.common import form_errors, operator_action, run_action, viewer_page
from serving import services
from serving.models import ApiKey, JoinToken
from swarm_portal.errors import ServiceError

ACCESS = "dashboards:access"
LISTED = 200


@viewer_page
def access(request: HttpRequest) -> HttpResponse:
    return _access_page(request)


def _access_page(request: HttpRequest, shown: dict[str, str] | None = None) -> HttpResponse:
    context = {
        "keys": ApiKey.objects.select_related("created_by").prefetch_related(
            "deployments")[:LISTED],
        # A join token is used when a server joins with it: its last use is the newest node.
        "tokens": JoinToken.objects.select_related("created_by").annotate(
            last_joined_at=Max("nodes__registered_at"))[:LISTED],
        "key_form": ApiKeyForm(), "token_form": JoinTokenForm(),
        "shown": shown,
        "portal_url": request.build_absolute_uri("/").rstrip("/"),
    }
    return render(request, "dashboards/access.html", context)


@viewer_page
def _show_once(request: HttpRequest, kind: str, name: str, secret: str) -> HttpResponse:
    """Answer the creating POST with the secret itself: it is stored nowhere, shown once."""
    response = _access_page(request, {"kind": kind, "name": name, "secret": secret})
    response["Cache-Control"] = "no-store"
    return response


@operator_action
def key_create(request: HttpRequest) -> HttpResponse:
    form = ApiKeyForm(request.POST)
    if not form.is_valid():
        messages.error(request, form_errors(form))
        return redirect(ACCESS)
    data = form.cleaned_data
    days = data["expires_in_days"]
    try:
        key, secret = services.do_create_api_key(
            name=data["name"], user=request.user, deployments=form.deployment_names(),
            expires_in=timedelta(days=days) if days else None,
            rate_limit_rps=data["rate_limit_rps"], burst=data["burst"] or 0,
            tokens_per_minute=data["tokens_per_minute"])
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect(ACCESS)
    return _show_once(request, "API key", key.name, secret)


@operator_action
def key_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    key = get_object_or_404(ApiKey, pk=pk)

    def revoke() -> str:
        services.do_revoke_api_key(key)
        return f"API key {key.name} ({key.prefix}…) revoked."
    return run_action(request, revoke, ACCESS)


@operator_action
def token_create(request: HttpRequest) -> HttpResponse:
    form = JoinTokenForm(request.POST)
    if not form.is_valid():
        messages.error(request, form_errors(form))
        return redirect(ACCESS)
    hours = form.cleaned_data["expires_in_hours"]
    token, secret = services.do_create_join_token(
        name=form.cleaned_data["name"], user=request.user,
        expires_in=timedelta(hours=hours) if hours else None, uses=form.cleaned_data["uses"])
    return _show_once(request, "join token", token.name, secret)


@operator_action
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(JoinToken, pk=pk)

    def revoke() -> str:
        services.do_revoke_join_token(token)
        return f"Join token {token.name} ({token.prefix}…) revoked."
    return run_action(request, revoke, ACCESS)
