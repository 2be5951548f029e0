"""Create an API key for /v2 clients; the key is printed once and stored as a digest."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from serving import services
from swarm_portal.errors import ServiceError


class Command(BaseCommand):
    help = "Create an API key (Authorization: Bearer <key>) for inference under /v2."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--name", default="cli")
        parser.add_argument("--owner", default="admin")
        parser.add_argument("--deployment", action="append", dest="deployments",
                            help="scope (repeatable); leave out for every deployment")
        parser.add_argument("--hours", type=float, default=0, help="lifetime (0: never ends)")
        parser.add_argument("--rate-limit-rps", type=float, default=None)

    def handle(self, *args, name: str, owner: str, deployments: list[str] | None,
               hours: float, rate_limit_rps: float | None, **options) -> None:
        user = get_user_model().objects.filter(username=owner).first()
        if user is None:
            raise CommandError(f"no user {owner!r}")
        try:
            _key, secret = services.do_create_api_key(
                name=name, user=user, deployments=deployments,
                expires_in=timedelta(hours=hours) if hours > 0 else None,
                rate_limit_rps=rate_limit_rps)
        except ServiceError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(secret)
