"""Create (or revoke) the token a `swarm-gateway` process uses to read the routing table."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from serving.gateway_api import issue_gateway_token, revoke_gateway_tokens
from swarm_portal.errors import ServiceError


class Command(BaseCommand):
    help = ("Create a gateway token and print only its secret, once (store it in the "
            "gateway's environment or a file, never on a command line); --revoke revokes.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("name", help="what the token is for, e.g. the gateway's host")
        parser.add_argument("--revoke", action="store_true",
                            help="revoke the tokens of that name instead")

    def handle(self, *args, name: str, revoke: bool, **options) -> None:
        if revoke:
            if revoke_gateway_tokens(name) == 0:
                raise CommandError(f"no gateway token named {name!r} is in use")
            self.stderr.write(f"revoked the gateway token {name!r}")
            return
        try:
            _token, secret = issue_gateway_token(name)
        except ServiceError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(secret)
