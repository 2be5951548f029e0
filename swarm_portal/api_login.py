"""POST /api/auth/login/: username and password in, a new API token out (for the `swarm` CLI).

The token is a django-rest-knox token like `make token`'s: shown once, stored as a digest,
with API_TOKEN_TTL_DAYS of life. Failed attempts are counted per client address and per
username in the cache; past MAX_FAILED_LOGINS within FAILED_LOGIN_WINDOW_S, every attempt
from that address (or for that username) answers 429 until the window passes, right
password or not, so a guesser learns nothing from the answers.
"""

from __future__ import annotations

import hashlib

from django.contrib.auth import authenticate
from django.core.cache import cache
from django.urls import path
from drf_spectacular.utils import OpenApiResponse, extend_schema
from knox.models import AuthToken
from knox.settings import knox_settings
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from swarm_portal.api import StrictSerializer

MAX_FAILED_LOGINS = 10
FAILED_LOGIN_WINDOW_S = 15 * 60
ERROR = OpenApiResponse(description='{"error": "..."}')


class LoginSerializer(StrictSerializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=4096, trim_whitespace=False,
                                     style={"input_type": "password"})


class LoginTokenSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="the API token (Authorization: Token ...): "
                                            "shown only now")
    expiry = serializers.DateTimeField(allow_null=True, help_text="null: never expires")
    username = serializers.CharField()


def _failure_keys(request: Request, username: str) -> list[str]:
    # Hashed: a username is free text, cache keys are not; both keys expire with the window.
    address = request.META.get("REMOTE_ADDR") or "unknown"
    return [f"login-failures:addr:{address}",
            "login-failures:user:" + hashlib.sha256(username.encode()).hexdigest()]


def _locked_out(keys: list[str]) -> bool:
    return any((cache.get(key) or 0) >= MAX_FAILED_LOGINS for key in keys)


def _count_failure(keys: list[str]) -> None:
    for key in keys:
        if cache.add(key, 1, timeout=FAILED_LOGIN_WINDOW_S):
            continue
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr: start again
            cache.add(key, 1, timeout=FAILED_LOGIN_WINDOW_S)


class LoginView(APIView):
    """Exchange a username and password for a new API token (one per login)."""

    authentication_classes: list[type] = []  # no session: no CSRF, nothing to ride on
    permission_classes = [AllowAny]
    serializer_class = LoginSerializer

    @extend_schema(request=LoginSerializer, auth=[],
                   responses={201: LoginTokenSerializer, 400: ERROR,
                              429: OpenApiResponse(description="too many failed attempts: "
                                                   '{"error": "..."}, Retry-After')})
    def post(self, request: Request) -> Response:
        body = LoginSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        username, password = body.validated_data["username"], body.validated_data["password"]
        keys = _failure_keys(request, username)
        if _locked_out(keys):
            return Response({"error": "too many failed logins: try again later"},
                            status=status.HTTP_429_TOO_MANY_REQUESTS,
                            headers={"Retry-After": str(FAILED_LOGIN_WINDOW_S)})
        user = authenticate(request._request, username=username, password=password)
        if user is None or not user.is_active:
            _count_failure(keys)
            return Response({"error": "wrong username or password"},
                            status=status.HTTP_400_BAD_REQUEST)
        instance, token = AuthToken.objects.create(user=user, expiry=knox_settings.TOKEN_TTL)
        data = {"token": token, "expiry": instance.expiry, "username": user.get_username()}
        return Response(LoginTokenSerializer(data).data, status=status.HTTP_201_CREATED)


urlpatterns = [
    path("login/", LoginView.as_view(), name="api-login"),
]
