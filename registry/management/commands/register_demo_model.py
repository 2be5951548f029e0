"""Build the demo models and register each as version 1 (alias production), once.

demo-mlp: a TorchScript MLP (registry/demo.py). demo-digits: a digit classifier trained
here on scikit-learn's bundled digits and written as ONNX, with image and label steps
(registry/demo_digits.py). tiny-lm: a 2-layer Llama with random weights and a tokenizer
trained on our own corpus, packed as an hf_causal_lm tar (registry/demo_lm.py); its build
(about 5 s) is cached under $SWARM_DEMO_CACHE or ~/.cache/swarm-portal, so a database
made again does not build it again.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from registry import demo_digits, demo_lm, services
from registry.demo import DEMO_MODEL_NAME, DEMO_SIGNATURE, save_torchscript
from registry.models import Model, ModelVersion
from swarm_protocol.archive_hf import TEXT_SIGNATURE


@dataclass
class DemoModel:
    """How to build one demo model: `build(directory)` writes the file and returns its
    path and metadata."""

    name: str
    description: str
    signature: dict[str, Any]
    build: Callable[[Path], tuple[Path, dict[str, Any]]]
    steps: dict[str, Any] | None = None
    labels_file: bytes | None = None
    suffix: str = ".demo"


def _build_mlp(directory: Path) -> tuple[Path, dict[str, Any]]:
    return save_torchscript(directory / "demo.pt"), {"source": "registry.demo.build_mlp",
                                                     "seed": 0}


def _build_digits(directory: Path) -> tuple[Path, dict[str, Any]]:
    path = directory / "digits.onnx"
    trained = demo_digits.save_onnx(path)  # trains now: about a second on one CPU
    return path, trained.metadata()


def _build_tiny_lm(directory: Path) -> tuple[Path, dict[str, Any]]:
    # The cached archive is read in place (register copies it): no second copy to write.
    del directory
    return demo_lm.cached_tiny_lm_archive(), {"source": "registry.demo_lm",
                                              "build_version": demo_lm.BUILD_VERSION}


DEMO_MODELS = (
    DemoModel(DEMO_MODEL_NAME, "A 4-feature, 3-class MLP built by Swarm Portal.",
              DEMO_SIGNATURE, _build_mlp),
    DemoModel(demo_digits.DIGITS_MODEL_NAME,
              "Handwritten digits: send a PNG or JPEG, get the digit. Trained by Swarm Portal "
              "on scikit-learn's bundled 8x8 digits.",
              demo_digits.DIGITS_SIGNATURE, _build_digits, steps=demo_digits.DIGITS_STEPS,
              labels_file=demo_digits.DIGITS_LABELS_FILE, suffix=".onnx"),
    DemoModel(demo_lm.DEMO_LM_NAME,
              "A tiny chat model (random weights: its answers are gibberish) built by Swarm "
              "Portal, to try streamed generation in the Playground.",
              TEXT_SIGNATURE, _build_tiny_lm, suffix=".tar"),
)


class Command(BaseCommand):
    help = "Register the demo models (built by our own code) that are not there yet."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--owner", default="admin")

    def handle(self, *args, owner: str, **options) -> None:
        user = get_user_model().objects.filter(username=owner).first()
        for demo in DEMO_MODELS:
            if Model.objects.filter(name=demo.name, versions__isnull=False).exists():
                self.stdout.write(f"demo model {demo.name!r} is registered")
                continue
            if user is None:
                raise CommandError(f"no user {owner!r}: run ensure_admin first")
            version = register(demo, user)
            self.stdout.write(f"registered {demo.name} v{version.number} "
                              f"(sha256 {version.sha256})")


def register(demo: DemoModel, user: Any) -> ModelVersion:
    """Build the demo's file, validate and store it as a version; alias production to it."""
    model = Model.objects.filter(name=demo.name).first() or services.do_create_model(
        name=demo.name, description=demo.description, owner=user)
    with tempfile.TemporaryDirectory() as tmp:
        path, metadata = demo.build(Path(tmp))
        staging = services.artifact_store().stage(suffix=demo.suffix)
        with path.open("rb") as source:
            shutil.copyfileobj(source, staging)
    version = services.do_create_version(
        model=model, staging=staging, signature=demo.signature, metadata=metadata,
        declared_format=None, user=user, steps=demo.steps, labels_file=demo.labels_file)
    services.do_move_alias(model=model, alias_name="production", version=version, user=user)
    return version
