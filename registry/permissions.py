"""Roles, as Django groups: admin, operator (deploy, scale, upload, keys), viewer (read only).

Staff and superusers are admins. Any other active, logged-in user is at least a viewer;
the `viewer` group makes the role explicit in the admin. `role_of` reads the groups once
per user object (pages ask several times per request).
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission

ADMIN_GROUP = "admin"
OPERATOR_GROUP = "operator"
VIEWER_GROUP = "viewer"
ROLE_GROUPS = (ADMIN_GROUP, OPERATOR_GROUP, VIEWER_GROUP)
OPERATORS_GROUP = OPERATOR_GROUP  # the old name of the constant, kept for its importers
LEGACY_OPERATORS_GROUP = "operators"  # renamed to OPERATOR_GROUP by registry 0002
ROLE_RANK = {VIEWER_GROUP: 1, OPERATOR_GROUP: 2, ADMIN_GROUP: 3}
WRITE_REFUSED = "only the operator and admin roles may do this (you are a viewer)"


def role_of(user: Any) -> str | None:
    """Return "admin", "operator" or "viewer" for an active logged-in user, else None."""
    if not user or not user.is_authenticated or not user.is_active:
        return None
    cached = getattr(user, "_swarm_role", None)
    if cached:
        return str(cached)
    if user.is_staff or user.is_superuser:
        role = ADMIN_GROUP
    else:
        names = set(user.groups.values_list("name", flat=True))
        role = next((name for name in (ADMIN_GROUP, OPERATOR_GROUP) if name in names),
                    VIEWER_GROUP)
    user._swarm_role = role
    return role


def has_role(user: Any, role: str) -> bool:
    """Return whether the user holds `role` or a higher one."""
    held = role_of(user)
    return held is not None and ROLE_RANK[held] >= ROLE_RANK[role]


def is_operator(user: Any) -> bool:
    """Return whether the user may deploy, scale, upload and manage keys."""
    return has_role(user, OPERATOR_GROUP)


def is_admin(user: Any) -> bool:
    return has_role(user, ADMIN_GROUP)


def can_view(user: Any) -> bool:
    return has_role(user, VIEWER_GROUP)


class IsOperatorOrReadOnly(BasePermission):
    """Any authenticated user reads; only operators and admins write."""

    message = WRITE_REFUSED

    def has_permission(self, request: Any, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        return request.method in SAFE_METHODS or is_operator(request.user)
