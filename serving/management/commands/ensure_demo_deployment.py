"""Deploy the demo model (following its `production` alias) on two replicas, once."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from registry.demo import DEMO_MODEL_NAME
from registry.models import Model
from serving import services
from serving.models import Deployment


class Command(BaseCommand):
    help = "Create the demo-mlp deployment if it does not exist."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--owner", default="admin")
        parser.add_argument("--replicas", type=int, default=2)

    def handle(self, *args, owner: str, replicas: int, **options) -> None:
        if Deployment.objects.filter(name=DEMO_MODEL_NAME).exists():
            self.stdout.write(f"deployment {DEMO_MODEL_NAME!r} exists")
            return
        model = Model.objects.filter(name=DEMO_MODEL_NAME).first()
        user = get_user_model().objects.filter(username=owner).first()
        if model is None or user is None:
            raise CommandError("register the demo model and the admin first")
        services.do_create_deployment(
            name=DEMO_MODEL_NAME, model=model, version_number=None, alias_name="production",
            user=user, replicas=replicas, max_batch_size=16, max_queue_delay_ms=2.0,
            device="auto", memory_bytes=256 * 1024**2, threads=1)
        self.stdout.write(f"deployed {DEMO_MODEL_NAME} with {replicas} replicas")
