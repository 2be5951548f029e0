"""Give the demo deployment a scaling policy, once, so `make run` shows the auto-scaler."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from registry.demo import DEMO_MODEL_NAME
from scaling import services
from scaling.models import ScalingPolicy
from serving.models import Deployment

DEMO_POLICY = {"min_replicas": 1, "max_replicas": 3, "target_in_flight_per_replica": 4.0}


class Command(BaseCommand):
    help = "Create a scaling policy for the demo-mlp deployment if it has none."

    def handle(self, *args, **options) -> None:
        deployment = Deployment.objects.filter(name=DEMO_MODEL_NAME).first()
        if deployment is None:
            self.stdout.write(f"no deployment {DEMO_MODEL_NAME!r}: nothing to do")
            return
        if ScalingPolicy.objects.filter(deployment=deployment).exists():
            self.stdout.write(f"{DEMO_MODEL_NAME} has a scaling policy")
            return
        services.do_set_policy(deployment, **DEMO_POLICY)
        self.stdout.write(f"{DEMO_MODEL_NAME} auto-scales between 1 and 3 replicas "
                          f"(target 4 requests in flight each)")
