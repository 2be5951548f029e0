"""Create the first admin account once; print its generated password once."""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand

from registry.permissions import ROLE_GROUPS


class Command(BaseCommand):
    help = "Create the admin user (password from SWARM_ADMIN_PASSWORD or generated) if missing."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default=os.environ.get("SWARM_ADMIN_USER", "admin"))

    def handle(self, *args, username: str, **options) -> None:
        for name in ROLE_GROUPS:
            Group.objects.get_or_create(name=name)
        users = get_user_model().objects
        if users.filter(username=username).exists():
            self.stdout.write(f"admin account {username!r} exists (password unchanged)")
            return
        password = os.environ.get("SWARM_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        users.create_superuser(username=username, email="", password=password)
        if os.environ.get("SWARM_ADMIN_PASSWORD"):
            self.stdout.write(f"created admin account {username!r} with SWARM_ADMIN_PASSWORD")
        else:
            self.stdout.write(self.style.WARNING(
                f"created admin account {username!r} with password: {password}\n"
                "  (shown once: note it now, or set SWARM_ADMIN_PASSWORD before the first run)"))
