"""Deployments: create, scale, change versions and weights, revisions, rollback, delete."""

from __future__ import annotations

import logging
import re
from typing import Any

from django.db import IntegrityError, transaction

from registry.models import Alias, Model, ModelVersion
from serving import live
from serving.models import Deployment
from serving.services.reconcile import delete_if_drained, reconcile_deployment
from serving.services.revisions import SPEC_FIELDS, record_revision, spec_of
from swarm_portal.errors import Conflict, NotFound, ServiceError

log = logging.getLogger(__name__)
MAX_REPLICAS = 256
MAX_TRAFFIC_VERSIONS = 64  # each gets its own replicas: more is a mistake
VERSION_NUMBER = re.compile(r"[0-9]{1,9}")


def resolve_version(model: Model, version_number: int | None, alias_name: str) -> ModelVersion:
    """Return the version named by number or alias (exactly one of them)."""
    if bool(version_number) == bool(alias_name):
        raise ServiceError("give either version or alias, not both or neither")
    if alias_name:
        alias = Alias.objects.select_related("version").filter(model=model,
                                                               name=alias_name).first()
        if alias is None:
            raise ServiceError(f"{model.name} has no alias {alias_name!r}")
        return alias.version
    version = model.versions.filter(number=version_number).first()
    if version is None:
        raise ServiceError(f"{model.name} has no version {version_number}")
    return version


def do_create_deployment(*, name: str, model: Model, version_number: int | None,
                         alias_name: str, user: Any, **settings_: Any) -> Deployment:
    """Create a deployment, record revision 1 and place its replicas."""
    version = resolve_version(model, version_number, alias_name)
    try:
        with transaction.atomic():
            deployment = Deployment.objects.create(name=name, model=model, version=version,
                                                   alias_name=alias_name, created_by=user,
                                                   **settings_)
            record_revision(deployment, "created", user)
    except IntegrityError:
        raise Conflict(f"a deployment named {name!r} already exists") from None
    reconcile_deployment(deployment.pk)
    live.bump_routes()
    return deployment


def do_scale_deployment(deployment: Deployment, replicas: int, user: Any = None, *,
                        pause_policy: bool = False) -> Deployment:
    """Set the desired replica count by hand and reconcile.

    Under an enabled scaling policy the auto-scaler owns the count: a hand-set one would
    silently revert at its next tick. So this refuses (409) unless `pause_policy`, which
    turns the policy off first (its settings stay; turning it on again resumes it).
    """
    policy = _enabled_policy(deployment)
    if policy is not None and not pause_policy:
        raise Conflict(f"the auto-scaler sets the replica count of {deployment.name} (policy "
                       f"on, {policy.min_replicas}..{policy.max_replicas} replicas): pause it "
                       f"to scale by hand (pause_policy), or change the policy's bounds")
    reason = f"scaled to {replicas} by hand"
    if policy is not None:
        from scaling.services import do_set_policy  # scaling builds on these services

        do_set_policy(deployment, enabled=False)
        reason += " (auto-scaler paused)"
    return do_update_deployment(deployment, {"replicas": replicas}, user, reason=reason)


def _enabled_policy(deployment: Deployment) -> Any:
    from scaling.models import ScalingPolicy

    return ScalingPolicy.objects.filter(deployment=deployment, enabled=True).first()


def check_traffic(deployment: Deployment, traffic: Any) -> dict[str, float]:
    """Return a clean {"<version>": weight} split, or raise a 400 that says what is wrong."""
    if not isinstance(traffic, dict):
        raise ServiceError('traffic must be an object {"<version>": weight}')
    if len(traffic) > MAX_TRAFFIC_VERSIONS:
        raise ServiceError(f"traffic: at most {MAX_TRAFFIC_VERSIONS} versions")
    clean: dict[str, float] = {}
    for number, weight in traffic.items():
        # ASCII digits only, and few: "²".isdigit() is True, and a long one overflows SQL.
        if not VERSION_NUMBER.fullmatch(str(number)):
            raise ServiceError(f"traffic: {str(number)[:20]!r} is not a version number")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ServiceError(f"traffic: the weight of version {number} must be >= 0")
        clean[str(int(number))] = float(weight)
    if clean and sum(clean.values()) <= 0:
        raise ServiceError("traffic: at least one version needs a positive weight")
    known = set(deployment.model.versions.filter(number__in=[int(n) for n in clean])
                .values_list("number", flat=True))
    missing = sorted(int(n) for n in clean if int(n) not in known)
    if missing:
        raise ServiceError(f"traffic: {deployment.model.name} has no version {missing[0]}")
    return clean


def do_update_deployment(deployment: Deployment, changes: dict[str, Any], user: Any,
                         reason: str = "updated") -> Deployment:
    """Change versions, weights or settings; record a revision; roll replicas over.

    A change to what the deployment already is saves nothing and records no revision (the
    history lists only real changes); it still reconciles, as asking again should.
    """
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().select_related("model").get(
            pk=deployment.pk)
        before = spec_of(deployment)
        _apply_changes(deployment, dict(changes))
        changed = spec_of(deployment) != before
        if changed:
            deployment.save()
            record_revision(deployment, reason, user)
    reconcile_deployment(deployment.pk)
    if changed:
        live.bump_routes()
    deployment.refresh_from_db()
    return deployment


def _apply_changes(deployment: Deployment, changes: dict[str, Any]) -> None:
    if "replicas" in changes and not 0 <= int(changes["replicas"]) <= MAX_REPLICAS:
        raise ServiceError(f"replicas must be between 0 and {MAX_REPLICAS}")
    if "version" in changes or "alias_name" in changes:
        alias_name = changes.pop("alias_name", "") or ""
        number = changes.pop("version", None)
        version = resolve_version(deployment.model, None if alias_name else number, alias_name)
        deployment.version, deployment.alias_name = version, alias_name
        deployment.traffic = {}
    if "traffic" in changes:
        deployment.traffic = check_traffic(deployment, changes.pop("traffic"))
    for name, value in changes.items():
        if name not in SPEC_FIELDS:
            raise ServiceError(f"{name} cannot be changed")
        setattr(deployment, name, value)


def do_rollback_deployment(deployment: Deployment, revision_number: int,
                           user: Any) -> Deployment:
    """Restore the settings of an earlier revision (as a new revision)."""
    revision = deployment.revisions.filter(number=revision_number).first()
    if revision is None:
        raise NotFound(f"{deployment.name} has no revision {revision_number}")
    spec = dict(revision.spec)
    changes = {name: spec[name] for name in SPEC_FIELDS if name in spec}
    if not changes.get("alias_name"):
        changes["version"] = spec["version"]
    return do_update_deployment(deployment, changes, user,
                                reason=f"rolled back to revision {revision_number}")


def do_delete_deployment(deployment: Deployment) -> None:
    """Drain every replica, then forget the deployment once they are gone."""
    with transaction.atomic():
        deployment.replica_set.update(desired=False)
        Deployment.objects.filter(pk=deployment.pk).update(replicas=0, deleting=True)
    live.bump_routes()
    delete_if_drained(deployment.pk)
