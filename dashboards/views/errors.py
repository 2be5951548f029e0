"""The portal's 404 and 403: a styled page with navigation, or JSON under /api/ and /v2/."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

JSON_PREFIXES = ("/api/", "/v2/")


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith(JSON_PREFIXES)


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Answer 404: {"error": ...} for API clients, else the page with the way back."""
    if _wants_json(request):
        return JsonResponse({"error": f"not found: {request.path[:200]}"}, status=404)
    return render(request, "404.html", {"path": request.path[:200]}, status=404)


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Answer 403 with the reason the view gave (e.g. "you need a role to see this page")."""
    reason = str(exception or "") or "you may not see this page"
    if _wants_json(request):
        return JsonResponse({"error": reason}, status=403)
    return render(request, "403.html", {"reason": reason}, status=403)
