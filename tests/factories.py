"""Build users, models and model files for tests (real torch archives, made here)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from django.contrib.auth.models import Group, User

from registry import services
from registry.demo import DEMO_SIGNATURE, save_torch_export, save_torchscript
from registry.models import Model, ModelVersion
from registry.permissions import OPERATORS_GROUP

SIGNATURE = DEMO_SIGNATURE


def make_user(username: str, *, operator: bool = False, staff: bool = False) -> User:
    user = User.objects.create_user(username=username, password="pw-" + username,
                                    is_staff=staff)
    if operator:
        group, _ = Group.objects.get_or_create(name=OPERATORS_GROUP)
        user.groups.add(group)
    return user


def make_model(owner: User, name: str = "mlp") -> Model:
    return services.do_create_model(name=name, description="test model", owner=owner)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def torchscript_file(directory: Path, seed: int = 0, name: str = "model.pt") -> Path:
    return save_torchscript(directory / name, seed=seed)


def torch_export_file(directory: Path, seed: int = 0, name: str = "model.pt2") -> Path:
    return save_torch_export(directory / name, seed=seed)


def add_version(model: Model, user: User, path: Path,
                signature: dict[str, Any] | None = None) -> ModelVersion:
    """Register a version through the real service (child-process validation included)."""
    staging = services.artifact_store().stage()
    staging.write(path.read_bytes())
    return services.do_create_version(model=model, staging=staging,
                                      signature=signature or SIGNATURE, metadata={},
                                      declared_format=None, user=user)
