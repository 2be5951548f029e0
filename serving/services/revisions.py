"""Deployment revisions: immutable snapshots of versions, weights and settings."""

from __future__ import annotations

from typing import Any

from django.db.models import Max

from registry.models import ModelVersion
from serving.models import Deployment, DeploymentRevision

# The fields a revision captures, and that a rollback restores.
SPEC_FIELDS = ("alias_name", "replicas", "traffic", "max_batch_size", "max_queue_delay_ms",
               "device", "memory_bytes", "threads", "policy", "max_in_flight_per_replica",
               "queue_limit", "request_timeout_s", "prefix_affinity_chars")


def spec_of(deployment: Deployment) -> dict[str, Any]:
    """Return the deployment's settings as a JSON-able snapshot."""
    spec = {name: getattr(deployment, name) for name in SPEC_FIELDS}
    spec["version"] = ModelVersion.objects.values_list("number", flat=True).get(
        pk=deployment.version_id)
    return spec


def record_revision(deployment: Deployment, reason: str, user: Any) -> DeploymentRevision:
    """Append an immutable revision with the deployment's current settings."""
    last = deployment.revisions.aggregate(last=Max("number"))["last"] or 0
    return DeploymentRevision.objects.create(deployment=deployment, number=last + 1,
                                             spec=spec_of(deployment), reason=reason[:200],
                                             created_by=user)
