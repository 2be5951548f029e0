"""Registry data: models, immutable versions, aliases and the audit of alias moves."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from swarm_protocol.signature import parse_signature
from swarm_protocol.steps import parse_steps, served_signature

ALIAS_NAME_VALIDATOR = RegexValidator(
    r"^[a-z][a-z0-9_-]{0,62}$",
    "alias names are lower-case letters, digits, '-' and '_', starting with a letter",
)


class ModelFormat(models.TextChoices):
    TORCHSCRIPT = "torchscript", "TorchScript (torch.jit.save)"
    TORCH_EXPORT = "torch_export", "torch.export program (.pt2)"
    ONNX = "onnx", "ONNX model (.onnx)"
    HF_CAUSAL_LM = "hf_causal_lm", "Hugging Face causal language model (tar or zip, safetensors)"


# Open Inference Protocol platform names, as Triton spells them.
PLATFORMS = {ModelFormat.TORCHSCRIPT: "pytorch_torchscript",
             ModelFormat.TORCH_EXPORT: "pytorch_torch_export",
             ModelFormat.ONNX: "onnxruntime_onnx",
             ModelFormat.HF_CAUSAL_LM: "transformers_causal_lm"}


class Model(models.Model):
    """A named model; its versions hold the artifacts."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="models_owned"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    """One immutable upload of a model: artifact, checksum, signature and steps never change."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    format = models.CharField(max_length=20, choices=ModelFormat.choices)
    artifact_name = models.CharField(max_length=255, help_text="path inside ARTIFACT_ROOT")
    sha256 = models.CharField(max_length=64, db_index=True)
    size_bytes = models.BigIntegerField()
    signature = models.JSONField(help_text="inputs and outputs: name, OIP datatype, shape")
    metadata = models.JSONField(default=dict, blank=True)
    artifact_info = models.JSONField(
        default=dict, blank=True,
        help_text="what the file says: ONNX opset and producer; whether the signature was "
                  "read from the file (signature_inferred)")
    steps = models.JSONField(
        default=dict, blank=True,
        help_text="processing steps around the model (registry/steps.py), labels included; "
                  "{} when none")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="versions_created"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["model", "number"], name="unique_version_number"),
            models.UniqueConstraint(fields=["model", "sha256"], name="unique_version_artifact"),
        ]

    def __str__(self) -> str:
        return f"{self.model.name}:{self.number}"

    @property
    def served_signature(self) -> dict[str, Any]:
        """Return the signature clients see: the model's, with the steps' tensors in place."""
        if not self.steps:
            return self.signature
        model_signature = parse_signature(self.signature)
        return served_signature(parse_steps(self.steps, model_signature),
                                model_signature).to_dict()

    @property
    def platform(self) -> str:
        """Return the OIP platform string, e.g. pytorch_torchscript or onnxruntime_onnx."""
        return PLATFORMS.get(self.format, f"pytorch_{self.format}")


class Alias(models.Model):
    """A movable name (say `production`) that points at one version of a model."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(max_length=63, validators=[ALIAS_NAME_VALIDATOR])
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="aliases")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "name"]
        verbose_name_plural = "aliases"
        constraints = [
            models.UniqueConstraint(fields=["model", "name"], name="unique_alias_per_model"),
        ]

    def __str__(self) -> str:
        return f"{self.model.name}@{self.name}"


class AliasMove(models.Model):
    """Audit row: who moved which alias, when, from which version to which."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="alias_moves")
    alias_name = models.CharField(max_length=63)
    from_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    to_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    moved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="alias_moves"
    )
    moved_at = models.DateTimeField(auto_now_add=True)
    is_rollback = models.BooleanField(default=False)

    class Meta:
        ordering = ["-moved_at", "-id"]
        indexes = [models.Index(fields=["model", "alias_name", "-moved_at"])]

    def __str__(self) -> str:
        return (f"{self.model.name}@{self.alias_name}: "
                f"{self.from_version_id} -> {self.to_version_id}")
