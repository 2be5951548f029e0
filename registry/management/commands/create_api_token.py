"""Create an API token for a user; the token is printed once and stored only as a digest."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from knox.models import AuthToken


class Command(BaseCommand):
    help = "Create an API token (Authorization: Token <token>) for a user."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username")
        parser.add_argument("--days", type=int, default=90, help="lifetime in days (0: never)")

    def handle(self, *args, username: str, days: int, **options) -> None:
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"no active user {username!r}")
        expiry = timedelta(days=days) if days > 0 else None
        _instance, token = AuthToken.objects.create(user=user, expiry=expiry)
        self.stdout.write(token)
