"""Periodic serving work: the node health sweep and the reconcile safety net."""

from __future__ import annotations

from celery import shared_task

from serving import services


@shared_task(ignore_result=True, acks_late=False)
def sweep_nodes() -> list[int]:
    """Mark nodes offline when the evidence says they are gone (see serving.liveness);
    their ready replicas serve until replacements are ready elsewhere."""
    return services.sweep_nodes()


@shared_task(ignore_result=True, acks_late=False)
def reconcile_deployments() -> None:
    """Bring every deployment to its desired replicas (placement retries, deletions)."""
    services.reconcile_all()
