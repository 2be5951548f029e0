"""Print a fresh join token for the local worker agents that `make run` starts."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from serving import services


class Command(BaseCommand):
    help = "Create a short-lived join token for local workers and print only the secret."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--owner", default="admin")
        parser.add_argument("--uses", type=int, default=2)

    def handle(self, *args, owner: str, uses: int, **options) -> None:
        user = get_user_model().objects.filter(username=owner).first()
        if user is None:
            raise CommandError(f"no user {owner!r}: run ensure_admin first")
        _token, secret = services.do_create_join_token(
            name="make run: local workers", user=user, expires_in=timedelta(minutes=10),
            uses=uses)
        self.stdout.write(secret)
