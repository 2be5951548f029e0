"""The auto-scaler's Celery tasks: the periodic tick and cold-start activation."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from scaling import node_services, services


@shared_task(ignore_result=True, acks_late=False)
def autoscale_tick() -> int:
    """Decide every deployment that has a policy, then the nodes; return replica changes."""
    changes = len(services.tick())
    # After the replicas: replicas this tick could not place ask the provider for nodes.
    node_services.tick_nodes()
    return changes


@shared_task(ignore_result=True, acks_late=False)
def activate_deployment(deployment_id: int, held: int) -> bool:
    """Start a deployment at zero because a gateway holds requests for it."""
    activated = services.do_activate(deployment_id, held) is not None
    if activated:
        node_services.tick_nodes()  # a cold start may need a node too
    return activated


def send_activation(deployment_id: int, held: int) -> None:
    """Queue activate_deployment (the registered activator); raise if the broker fails."""
    # Expires with the gateway's hold: a later run would start replicas nobody waits for.
    activate_deployment.apply_async(args=[deployment_id, held],
                                    expires=settings.GATEWAY_HOLD_TIMEOUT_S or None)
