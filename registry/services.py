"""Every registry write: the row, the artifact and the audit trail in one place."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Max

from registry.models import ALIAS_NAME_VALIDATOR, Alias, AliasMove, Model, ModelVersion
from registry.storage import ArtifactStore, StagingFile
from registry.validation import ArtifactRejected, ValidationResult, validate_artifact
from swarm_portal.errors import Conflict, NotFound, ServiceError, ServiceUnavailable
from swarm_protocol.archive import ArchiveLimits
from swarm_protocol.signature import SignatureError, parse_signature
from swarm_protocol.signature_infer import parse_example_input
from swarm_protocol.steps import StepsError, parse_labels_file

log = logging.getLogger(__name__)
MAX_METADATA_BYTES = 64 * 1024
_validation_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def artifact_store() -> ArtifactStore:
    return ArtifactStore(settings.ARTIFACT_ROOT)


def parse_json_field(raw: Any, field: str, default: Any) -> Any:
    """Return a JSON form field (string or already parsed), or raise a 400 naming the field."""
    if raw is None or raw == "":
        return default
    if isinstance(raw, (dict, list)):
        return raw
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ServiceError(f"{field} is not valid JSON: {exc}") from None


def checked_signature(raw: Any) -> dict[str, Any] | None:
    """Return the declared signature, normalised; None when none was given (inferred)."""
    if raw is None:
        return None
    try:
        return parse_signature(raw).to_dict()
    except SignatureError as exc:
        raise ServiceError(f"signature: {exc}") from None


def checked_example_input(raw: Any) -> list[dict[str, Any]] | None:
    """Return the TorchScript example input (input specs), or a 400 naming the field."""
    if raw is None:
        return None
    try:
        return [spec.to_dict() for spec in parse_example_input(raw)]
    except SignatureError as exc:
        raise ServiceError(str(exc)) from None


def raw_steps(raw: Any, labels_file: bytes | None) -> dict[str, Any] | None:
    """Return the steps as given, the labels file's lines put in; a 400 on their form
    (they are checked against the model's signature in the validation child)."""
    if raw is None:
        if labels_file is not None:
            raise ServiceError("a labels file needs steps that use it (steps.outputs[].labels)")
        return None
    if not isinstance(raw, dict):
        raise ServiceError("steps must be a JSON object")
    if labels_file is None:
        return raw
    if "labels" in raw:
        raise ServiceError("give the labels in the labels file or in steps, not both")
    try:
        return {**raw, "labels": parse_labels_file(labels_file)}
    except StepsError as exc:
        raise ServiceError(str(exc)) from None


def checked_metadata(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ServiceError("metadata must be a JSON object")
    if len(json.dumps(raw)) > MAX_METADATA_BYTES:
        raise ServiceError(f"metadata must be under {MAX_METADATA_BYTES} bytes of JSON")
    return raw


def do_create_model(*, name: str, description: str, owner: Any) -> Model:
    """Create a model; its name must be unused."""
    try:
        with transaction.atomic():
            return Model.objects.create(name=name, description=description, owner=owner)
    except IntegrityError:
        raise Conflict(f"a model named {name!r} already exists") from None


def do_create_version(
    *,
    model: Model,
    staging: StagingFile,
    signature: Any,
    metadata: Any,
    declared_format: str | None,
    user: Any,
    example_input: Any = None,
    steps: Any = None,
    labels_file: bytes | None = None,
) -> ModelVersion:
    """Validate a staged artifact in a child process, store it and record the version.

    `signature` None: the one the file states is recorded (TorchScript needs
    `example_input`); a declared one is checked against the file. On any refusal
    nothing is left: no row, no stored file, no staging file.
    """
    try:
        clean_signature = checked_signature(signature)
        clean_metadata = checked_metadata(metadata)
        clean_example = checked_example_input(example_input)
        given_steps = raw_steps(steps, labels_file)
        staging.close()
        if staging.size_bytes == 0:
            raise ServiceError("the artifact is empty")
        _refuse_duplicate(model, staging.sha256)
        try:
            with validation_slot():
                result = validate_artifact(
                    staging.path, clean_signature, declared_format,
                    timeout_s=settings.VALIDATION_TIMEOUT_S,
                    memory_bytes=settings.VALIDATION_MEMORY_BYTES, limits=archive_limits(),
                    example_input=clean_example, steps=given_steps,
                )
        except ArtifactRejected as exc:
            raise ServiceError(str(exc)) from None
        # The child's signature is the declared one, or the file's own (checked either way).
        return _store_version(model, staging, checked_signature(result.signature),
                              clean_metadata, result, user)
    finally:
        staging.discard()


def archive_limits() -> ArchiveLimits:
    """Return the archive limits from the settings (checked before anything inflates)."""
    return ArchiveLimits(max_uncompressed_bytes=settings.ARCHIVE_MAX_UNCOMPRESSED_BYTES,
                         max_ratio=settings.ARCHIVE_MAX_RATIO)


def validation_slots(concurrency: int) -> threading.BoundedSemaphore:
    """Return this process's semaphore bounding concurrent validation children."""
    with _slots_lock:
        return _validation_slots.setdefault(concurrency, threading.BoundedSemaphore(concurrency))


@contextlib.contextmanager
def validation_slot() -> Iterator[None]:
    """Hold one validation slot; wait at most VALIDATION_QUEUE_WAIT_S, then refuse with 503.

    Each child may take VALIDATION_MEMORY_BYTES: an unbounded number of them would let a
    burst of uploads exhaust the host's memory, so a busy portal says "retry" instead.
    """
    slots = validation_slots(settings.VALIDATION_CONCURRENCY)
    if not slots.acquire(timeout=settings.VALIDATION_QUEUE_WAIT_S):
        retry_after_s = max(1, round(settings.VALIDATION_TIMEOUT_S / 4))
        raise ServiceUnavailable(
            f"{settings.VALIDATION_CONCURRENCY} uploads are being validated already "
            f"(VALIDATION_CONCURRENCY); retry in {retry_after_s} s", retry_after_s=retry_after_s)
    try:
        yield
    finally:
        slots.release()


def _refuse_duplicate(model: Model, sha256: str) -> None:
    existing = model.versions.filter(sha256=sha256).values_list("number", flat=True).first()
    if existing is not None:
        raise Conflict(f"this artifact is already version {existing} of {model.name}")


def _store_version(model: Model, staging: StagingFile, signature: dict[str, Any] | None,
                   metadata: dict[str, Any], result: ValidationResult,
                   user: Any) -> ModelVersion:
    store = artifact_store()
    stored, created = store.commit(staging)
    try:
        with transaction.atomic():
            locked = Model.objects.select_for_update().get(pk=model.pk)
            last = locked.versions.aggregate(last=Max("number"))["last"] or 0
            return ModelVersion.objects.create(
                model=locked, number=last + 1, format=result.format, artifact_name=stored.name,
                sha256=stored.sha256, size_bytes=stored.size_bytes, signature=signature,
                metadata=metadata, artifact_info=result.info, steps=result.steps,
                created_by=user,
            )
    except IntegrityError:
        if created:
            store.delete(stored.name)
        raise Conflict("this artifact was uploaded to this model at the same time") from None
    except BaseException:
        if created:
            store.delete(stored.name)
        raise


def find_version(model: Model, number: Any) -> ModelVersion:
    """Return the model's version `number`, or a 404 naming it."""
    try:
        return model.versions.get(number=int(number))
    except (ValueError, TypeError, ModelVersion.DoesNotExist):
        raise NotFound(f"{model.name} has no version {number!r}") from None


@transaction.atomic
def do_move_alias(*, model: Model, alias_name: str, version: ModelVersion, user: Any,
                  is_rollback: bool = False) -> Alias:
    """Point the alias at `version` (creating it if new) and audit the move."""
    if version.model_id != model.pk:
        raise ServiceError(f"version {version.number} does not belong to {model.name}")
    try:
        ALIAS_NAME_VALIDATOR(alias_name)
    except ValidationError as exc:
        raise ServiceError(f"alias name {alias_name!r}: {exc.messages[0]}") from None
    alias = Alias.objects.select_for_update().filter(model=model, name=alias_name).first()
    from_version = alias.version if alias else None
    if alias is None:
        alias = Alias(model=model, name=alias_name, version=version)
    alias.version = version
    alias.save()
    AliasMove.objects.create(model=model, alias_name=alias_name, from_version=from_version,
                             to_version=version, moved_by=user, is_rollback=is_rollback)
    log.info("alias %s@%s moved %s -> %s by %s", model.name, alias_name,
             from_version.number if from_version else None, version.number, user)
    return alias


@transaction.atomic
def do_rollback_alias(*, model: Model, alias_name: str, user: Any) -> Alias:
    """Move the alias back to the version it pointed at before its last move."""
    alias = Alias.objects.select_for_update().filter(model=model, name=alias_name).first()
    if alias is None:
        raise NotFound(f"{model.name} has no alias {alias_name!r}")
    last = AliasMove.objects.filter(model=model, alias_name=alias_name).first()
    if last is None or last.from_version is None:
        raise ServiceError(f"alias {alias_name!r} has no earlier version to roll back to")
    return do_move_alias(model=model, alias_name=alias_name, version=last.from_version,
                         user=user, is_rollback=True)


@transaction.atomic
def do_delete_alias(*, model: Model, alias_name: str, user: Any) -> None:
    """Remove an alias, auditing the removal as a move to nothing."""
    alias = Alias.objects.select_for_update().filter(model=model, name=alias_name).first()
    if alias is None:
        raise NotFound(f"{model.name} has no alias {alias_name!r}")
    AliasMove.objects.create(model=model, alias_name=alias_name, from_version=alias.version,
                             to_version=None, moved_by=user)
    alias.delete()
