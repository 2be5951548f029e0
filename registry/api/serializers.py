"""Registry REST shapes."""

from __future__ import annotations

from rest_framework import serializers

from registry.models import Alias, AliasMove, Model, ModelFormat, ModelVersion
from swarm_portal.api import StrictModelSerializer, StrictSerializer

MAX_DESCRIPTION_CHARS = 10_000
MAX_VERSION = 2**31 - 1  # the database's integer column


class TensorSpecSerializer(serializers.Serializer):
    name = serializers.CharField()
    datatype = serializers.CharField()
    shape = serializers.ListField(child=serializers.IntegerField())


class SignatureSerializer(serializers.Serializer):
    inputs = TensorSpecSerializer(many=True)
    outputs = TensorSpecSerializer(many=True)


class ModelSerializer(StrictModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    latest_version = serializers.IntegerField(read_only=True, allow_null=True)
    aliases = serializers.SerializerMethodField()

    class Meta:
        model = Model
        fields = ["name", "description", "owner", "created_at", "latest_version", "aliases"]
        read_only_fields = ["created_at"]
        extra_kwargs = {"description": {"max_length": MAX_DESCRIPTION_CHARS}}

    def get_aliases(self, obj: Model) -> dict[str, int]:
        return {alias.name: alias.version.number for alias in obj.aliases.all()}


class ModelUpdateSerializer(StrictModelSerializer):
    class Meta:
        model = Model
        fields = ["description"]
        extra_kwargs = {"description": {"max_length": MAX_DESCRIPTION_CHARS}}


class ModelVersionSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name", read_only=True)
    created_by = serializers.CharField(source="created_by.username", read_only=True)
    signature = SignatureSerializer(read_only=True)
    served_signature = SignatureSerializer(
        read_only=True, help_text="what clients send and get: the signature after the steps")
    platform = serializers.CharField(read_only=True)
    download_url = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields = ["model", "number", "format", "platform", "sha256", "size_bytes", "signature",
                  "served_signature", "steps", "metadata", "artifact_info", "created_by",
                  "created_at", "download_url"]
        read_only_fields = fields

    def get_download_url(self, obj: ModelVersion) -> str:
        return f"/api/models/{obj.model.name}/versions/{obj.number}/artifact"


class VersionUploadSerializer(serializers.Serializer):
    """The multipart form of a version upload (documentation and field checks)."""

    artifact = serializers.FileField(
        help_text="the TorchScript (.pt), torch.export (.pt2) or ONNX (.onnx) file")
    signature = serializers.JSONField(
        required=False,
        help_text='{"inputs": [...], "outputs": [...]}; left out: read from the file (ONNX, '
                  "torch.export; TorchScript with example_input), checked against it if given")
    example_input = serializers.JSONField(
        required=False,
        help_text='TorchScript only: [{"name", "datatype", "shape"}, ...] of its inputs (-1 = '
                  "variable); the outputs are observed from forward passes on zeros")
    metadata = serializers.JSONField(required=False, help_text="free-form JSON object")
    steps = serializers.JSONField(
        required=False,
        help_text='processing steps around the model: {"inputs": [{"input", "name", "color", '
                  '"layout", "scale", "mean", "std"}], "outputs": [{"output", "softmax", '
                  '"top_k", "scores", "labels", "indices"}]} (images in, labels out)')
    labels = serializers.FileField(
        required=False, help_text="UTF-8 text, one class label per line (for steps' labels)")
    format = serializers.ChoiceField(choices=ModelFormat.choices, required=False,
                                     help_text="checked against the archive; detected if left out")


class AliasSerializer(serializers.ModelSerializer):
    version = serializers.IntegerField(source="version.number")

    class Meta:
        model = Alias
        fields = ["name", "version", "updated_at"]
        read_only_fields = ["name", "updated_at"]


class AliasMoveRequestSerializer(StrictSerializer):
    version = serializers.IntegerField(min_value=1, max_value=MAX_VERSION)


class AliasMoveSerializer(serializers.ModelSerializer):
    alias = serializers.CharField(source="alias_name")
    from_version = serializers.IntegerField(source="from_version.number", allow_null=True,
                                            default=None)
    to_version = serializers.IntegerField(source="to_version.number", allow_null=True,
                                          default=None)
    moved_by = serializers.CharField(source="moved_by.username")

    class Meta:
        model = AliasMove
        fields = ["alias", "from_version", "to_version", "moved_by", "moved_at", "is_rollback"]
        read_only_fields = fields
