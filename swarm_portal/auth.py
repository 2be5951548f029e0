"""Authentication for the few views that live outside DRF (streams)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest
from knox.auth import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed


def _token_user(key: str) -> Any | None:
    try:
        user, _token = TokenAuthentication().authenticate_credentials(key.encode())
    except AuthenticationFailed:
        return None
    return user


async def authenticate_async(request: HttpRequest) -> Any | None:
    """Return the active user behind a session or an `Authorization: Token` header."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "token" and key.strip():
        user = await sync_to_async(_token_user)(key.strip())
    else:
        user = await request.auser()
    if user is None or not user.is_authenticated or not user.is_active:
        return None
    return user
