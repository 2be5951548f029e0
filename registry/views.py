"""Registry pages: list, detail with versions and alias history, create, upload."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_POST

from registry import listing, services
from registry.api.views import alias_moves, create_version_from_request, staging_upload_handler
from registry.forms import AliasMoveForm, ModelCreateForm, VersionUploadForm
from registry.models import Model
from registry.permissions import WRITE_REFUSED, is_operator
from swarm_portal.errors import ServiceError

MODELS_PER_PAGE = 25
LIST_COLUMNS = (("name", "Name"), ("versions", "Versions"), ("latest", "Latest"),
                ("created", "Created"))


def _require_operator(request: HttpRequest) -> None:
    if not is_operator(request.user):
        raise PermissionDenied(WRITE_REFUSED)


def model_list(request: HttpRequest) -> HttpResponse:
    """List models: ?q= searches names and descriptions, ?sort= orders, ?page= pages."""
    search = request.GET.get("q", "")[:listing.MAX_SEARCH_CHARS]
    sort = request.GET.get("sort", "")
    sort = sort if sort in listing.SORTS else listing.DEFAULT_SORT  # a page never fails on it
    models = listing.models_matching(Model.objects.select_related("owner"), search, sort)
    page = Paginator(models, MODELS_PER_PAGE).get_page(request.GET.get("page"))

    def link(**changes: Any) -> str:
        query = {"q": search, "sort": sort, **changes}
        return "?" + urlencode({key: value for key, value in query.items()
                                if value and (key, value) != ("sort", listing.DEFAULT_SORT)})
    columns = [{"label": label, "href": link(sort=f"-{key}" if sort == key else key),
                "aria_sort": ("ascending" if sort == key else
                              "descending" if sort == f"-{key}" else "none")}
               for key, label in LIST_COLUMNS]
    return render(request, "registry/model_list.html", {
        "models": page, "page": page, "search": search, "columns": columns,
        "previous": link(page=page.previous_page_number()) if page.has_previous() else "",
        "next": link(page=page.next_page_number()) if page.has_next() else "",
        "can_edit": is_operator(request.user)})


def model_detail(request: HttpRequest, name: str) -> HttpResponse:
    model = get_object_or_404(Model.objects.select_related("owner"), name=name)
    versions = list(model.versions.select_related("created_by"))
    served = _served_by(model)
    for version in versions:
        version.served_by = served.get(version.number, [])
    context = {
        "model": model,
        "versions": versions,
        "aliases": model.aliases.select_related("version"),
        "moves": alias_moves(model)[:50],
        "can_edit": is_operator(request.user),
        "alias_form": AliasMoveForm(),
    }
    return render(request, "registry/model_detail.html", context)


def _served_by(model: Model) -> dict[int, list[str]]:
    """Return {version number: names of the deployments sending it traffic} (one query)."""
    served: dict[int, list[str]] = {}
    for name, primary, traffic in model.deployments.values_list(
            "name", "version__number", "traffic").order_by("name"):
        numbers = {int(n) for n, weight in traffic.items() if float(weight) > 0} or {primary}
        for number in numbers:
            served.setdefault(number, []).append(name)
    return served


def model_create(request: HttpRequest) -> HttpResponse:
    _require_operator(request)
    form = ModelCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            model = services.do_create_model(name=form.cleaned_data["name"],
                                             description=form.cleaned_data["description"],
                                             owner=request.user)
        except ServiceError as exc:
            form.add_error("name", exc.message)
        else:
            return redirect("registry:model-detail", name=model.name)
    return render(request, "registry/model_create.html", {"form": form})


@csrf_exempt
def version_upload(request: HttpRequest, name: str) -> HttpResponse:
    """Show the upload form; on POST stream, validate and store the new version.

    The page posts with XMLHttpRequest to show progress and wants JSON back; a
    plain form post (no script) gets a redirect or the form with the error.
    Django's CSRF check reads the body, so the streaming upload handler is installed
    first and the check runs after, in _checked_upload (as Django's docs prescribe).
    """
    _require_operator(request)
    model = get_object_or_404(Model, name=name)
    if request.method != "POST":
        return _checked_upload(request, model, None)
    handler = staging_upload_handler()
    request.upload_handlers = [handler]
    try:
        return _checked_upload(request, model, handler)
    finally:
        handler.discard()  # a refused CSRF check leaves no staged file either


def _upload_initial(model: Model) -> dict[str, str]:
    """Prefill a new version's signature with the latest version's: a new version of a model
    most often keeps its tensors (clear the field to have it read from the file)."""
    latest = model.versions.order_by("-number").first()
    return {"signature": json.dumps(latest.signature)} if latest is not None else {}


@csrf_protect
def _checked_upload(request: HttpRequest, model: Model, handler: Any) -> HttpResponse:
    wants_json = request.headers.get("Accept", "").startswith("application/json")
    if request.method != "POST":
        return render(request, "registry/upload.html",
                      {"model": model, "form": VersionUploadForm(initial=_upload_initial(model))})
    try:
        version = create_version_from_request(request, model, handler)
    except ServiceError as exc:
        if wants_json:
            return JsonResponse({"error": exc.message}, status=exc.status_code,
                                headers=exc.headers)
        form = VersionUploadForm(request.POST)
        return render(request, "registry/upload.html",
                      {"model": model, "form": form, "error": exc.message},
                      status=exc.status_code)
    target = reverse("registry:model-detail", kwargs={"name": model.name})
    # Said on the page the upload leads to, whether the script or the form posted it.
    messages.success(request, f"Version {version.number} uploaded (sha256 {version.sha256}).")
    if wants_json:
        return JsonResponse({"number": version.number, "sha256": version.sha256,
                             "redirect": target}, status=201)
    return redirect(target)


@require_POST
def alias_move(request: HttpRequest, name: str) -> HttpResponse:
    _require_operator(request)
    model = get_object_or_404(Model, name=name)
    form = AliasMoveForm(request.POST)
    try:
        if not form.is_valid():
            raise ServiceError("; ".join(f"{k}: {v[0]}" for k, v in form.errors.items()))
        version = services.find_version(model, form.cleaned_data["version"])
        services.do_move_alias(model=model, alias_name=form.cleaned_data["alias"],
                               version=version, user=request.user)
        messages.success(request, f"{form.cleaned_data['alias']} now points at "
                                  f"version {version.number}.")
    except ServiceError as exc:
        messages.error(request, exc.message)
    return redirect("registry:model-detail", name=model.name)


@require_POST
def alias_rollback(request: HttpRequest, name: str, alias: str) -> HttpResponse:
    _require_operator(request)
    model = get_object_or_404(Model, name=name)
    try:
        moved = services.do_rollback_alias(model=model, alias_name=alias, user=request.user)
        messages.success(request, f"{alias} rolled back to version {moved.version.number}.")
    except ServiceError as exc:
        messages.error(request, exc.message)
    return redirect("registry:model-detail", name=model.name)
