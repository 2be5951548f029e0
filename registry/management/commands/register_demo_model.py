"""Build the demo MLP and register it as version 1 (alias production), once."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from registry import services
from registry.demo import DEMO_MODEL_NAME, DEMO_SIGNATURE, save_torchscript
from registry.models import Model


class Command(BaseCommand):
    help = "Register the demo TorchScript MLP (built by our own code) if it is not there yet."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--owner", default="admin")

    def handle(self, *args, owner: str, **options) -> None:
        if Model.objects.filter(name=DEMO_MODEL_NAME, versions__isnull=False).exists():
            self.stdout.write(f"demo model {DEMO_MODEL_NAME!r} is registered")
            return
        user = get_user_model().objects.filter(username=owner).first()
        if user is None:
            raise CommandError(f"no user {owner!r}: run ensure_admin first")
        model = Model.objects.filter(name=DEMO_MODEL_NAME).first() or services.do_create_model(
            name=DEMO_MODEL_NAME, description="A 4-feature, 3-class MLP built by Swarm Portal.",
            owner=user)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_torchscript(Path(tmp) / "demo.pt")
            staging = services.artifact_store().stage(suffix=".demo")
            with path.open("rb") as source:
                shutil.copyfileobj(source, staging)
        version = services.do_create_version(
            model=model, staging=staging, signature=DEMO_SIGNATURE,
            metadata={"source": "registry.demo.build_mlp", "seed": 0}, declared_format=None,
            user=user)
        services.do_move_alias(model=model, alias_name="production", version=version, user=user)
        self.stdout.write(f"registered {model.name} v{version.number} (sha256 {version.sha256})")
