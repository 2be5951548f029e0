"""Pages need a login; APIs answer 401 JSON themselves, health checks need nothing."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse

# Paths that do their own authentication (JSON 401s) or need none.
OPEN_PREFIXES = ("/api/", "/v2", "/healthz", "/readyz", "/metrics", "/static/", "/admin/",
                 "/login/", "/favicon.ico")

# Pages under an open prefix that still want a login redirect rather than a JSON 401.
PAGE_PREFIXES = ("/api/docs/",)


class LoginRequiredMiddleware:
    """Redirect anonymous users to the login page for every portal page."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        is_page = request.path.startswith(PAGE_PREFIXES) or not request.path.startswith(
            OPEN_PREFIXES)
        if is_page and not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)
        return self.get_response(request)
