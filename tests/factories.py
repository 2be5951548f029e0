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


class FileMaker:
    """A pickle whose unpickling creates a marker file (the hostile payload of the tests)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def hostile_pickle(marker: Path) -> bytes:
    """Return pickle bytes that create `marker` when unpickled by an unrestricted loader."""
    import pickle

    return pickle.dumps(FileMaker(marker))


def rewrite_archive(source: Path, target: Path, *, replace: dict[str, bytes] | None = None,
                    add: dict[str, bytes] | None = None) -> Path:
    """Copy a torch archive, swapping or adding entries named relative to its top folder."""
    import zipfile

    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        root = old.namelist()[0].split("/", 1)[0]
        for info in old.infolist():
            tail = info.filename.split("/", 1)[1]
            new.writestr(info, replace.get(tail, old.read(info)))
        for tail, content in add.items():
            new.writestr(f"{root}/{tail}", content)
    return target


def with_pickled_weight(source: Path, target: Path, marker: Path) -> Path:
    """Return a .pt2 whose weights config marks weight_0 `use_pickle`, holding a hostile pickle."""
    import json
    import zipfile

    config_name = "data/weights/model_weights_config.json"
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        config = json.loads(archive.read(f"{root}/{config_name}"))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    return rewrite_archive(source, target, replace={
        config_name: json.dumps(config).encode(),
        f"data/weights/{first['path_name']}": hostile_pickle(marker),
    })
