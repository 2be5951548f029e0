"""Deploy the demo models (following their `production` alias), each once: demo-mlp on
two replicas, demo-digits and tiny-lm on one."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from registry.demo import DEMO_MODEL_NAME
from registry.demo_digits import DIGITS_MODEL_NAME
from registry.demo_lm import DEMO_LM_NAME
from registry.models import Model
from serving import services
from serving.models import Deployment

DIGITS_REPLICAS = 1
TINY_LM_REPLICAS = 1


class Command(BaseCommand):
    help = "Create the demo-mlp, demo-digits and tiny-lm deployments that do not exist."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--owner", default="admin")
        parser.add_argument("--replicas", type=int, default=2, help="demo-mlp's replicas")

    def handle(self, *args, owner: str, replicas: int, **options) -> None:
        for name, count in ((DEMO_MODEL_NAME, replicas), (DIGITS_MODEL_NAME, DIGITS_REPLICAS),
                            (DEMO_LM_NAME, TINY_LM_REPLICAS)):
            self.ensure(name, count, owner)

    def ensure(self, name: str, replicas: int, owner: str) -> None:
        """Create the deployment `name` of the model `name` unless it exists."""
        if Deployment.objects.filter(name=name).exists():
            self.stdout.write(f"deployment {name!r} exists")
            return
        model = Model.objects.filter(name=name).first()
        user = get_user_model().objects.filter(username=owner).first()
        if model is None or user is None:
            raise CommandError(f"register the demo model {name!r} and the admin first")
        services.do_create_deployment(
            name=name, model=model, version_number=None, alias_name="production",
            user=user, replicas=replicas, max_batch_size=16, max_queue_delay_ms=2.0,
            device="auto", memory_bytes=256 * 1024**2, threads=1)
        self.stdout.write(f"deployed {name} with {replicas} replica{'s' * (replicas != 1)}")
