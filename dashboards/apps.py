from __future__ import annotations

from django.apps import AppConfig


class DashboardsConfig(AppConfig):
    name = "dashboards"
    verbose_name = "Dashboards"

    def ready(self) -> None:
        # The services publish live events without naming the dashboards (swarm_portal.live_events).
        from dashboards import events
        from swarm_portal import live_events

        live_events.subscribe(events.on_live_event)
