from __future__ import annotations

from django.apps import AppConfig


class ScalingConfig(AppConfig):
    name = "scaling"
    verbose_name = "Auto-scaling"

    def ready(self) -> None:
        # The gateway API (serving) activates through swarm_portal.activation, not by task name.
        from scaling import tasks
        from swarm_portal import activation

        activation.register(tasks.send_activation)
