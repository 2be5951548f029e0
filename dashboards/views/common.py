"""What every dashboards view shares: the role checks and turning refusals into messages."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from registry.permissions import WRITE_REFUSED, can_view, is_operator, role_of
from swarm_portal.errors import ServiceError

View = Callable[..., HttpResponse]


def viewer_page(view: View) -> View:
    """A read-only page: any role may see it; the template learns whether to show controls."""
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not can_view(request.user):
            raise PermissionDenied("you need a role to see this page")
        request.can_operate = is_operator(request.user)  # type: ignore[attr-defined]
        request.role = role_of(request.user)  # type: ignore[attr-defined]
        return view(request, *args, **kwargs)
    return wrapped


def operator_action(view: View) -> View:
    """A control (POST only): operators and admins; anyone else gets 403."""
    @require_POST
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not is_operator(request.user):
            raise PermissionDenied(WRITE_REFUSED)
        return view(request, *args, **kwargs)
    return wrapped


def form_errors(form: Any) -> str:
    """Return a form's errors as one readable line."""
    return "; ".join(f"{'' if name == '__all__' else name + ': '}{errors[0]}"
                     for name, errors in form.errors.items())


def run_action(request: HttpRequest, action: Callable[[], str], back: str,
               **back_kwargs: Any) -> HttpResponse:
    """Run a write; flash its success text or the ServiceError's message; redirect back."""
    try:
        messages.success(request, action())
    except ServiceError as exc:
        messages.error(request, exc.message)
    return redirect(back, **back_kwargs)
