"""Registry REST endpoints: models, versions (upload), aliases and their history."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Max, Prefetch, QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from registry import listing, services
from registry.api.serializers import (
    AliasMoveRequestSerializer,
    AliasMoveSerializer,
    AliasSerializer,
    ModelSerializer,
    ModelUpdateSerializer,
    ModelVersionSerializer,
    VersionUploadSerializer,
)
from registry.models import Alias, AliasMove, Model, ModelVersion
from registry.permissions import IsOperatorOrReadOnly
from registry.uploads import ARTIFACT_FIELD, StagingUploadHandler
from swarm_portal.api import check_query_value
from swarm_portal.errors import ServiceError

ERROR = OpenApiResponse(description='{"error": "..."}')


def models_with_summary() -> QuerySet[Model]:
    aliases = Prefetch("aliases", queryset=Alias.objects.select_related("version"))
    return (Model.objects.select_related("owner").prefetch_related(aliases)
            .annotate(latest_version=Max("versions__number")))


class ModelViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                   mixins.UpdateModelMixin, viewsets.GenericViewSet):
    """Models: list, create, read, edit the description."""

    permission_classes = [IsOperatorOrReadOnly]
    lookup_field = "name"
    lookup_value_regex = "[-a-zA-Z0-9_]+"
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[Model]:
        return models_with_summary()

    @extend_schema(parameters=[
        OpenApiParameter("search", str, description="part of the name or description "
                         f"(case-insensitive, at most {listing.MAX_SEARCH_CHARS} characters)"),
        OpenApiParameter("sort", str, enum=list(listing.SORTS),
                         description=f"order; '-' first: descending (default "
                                     f"{listing.DEFAULT_SORT})")],
        responses={200: ModelSerializer(many=True), 400: ERROR})
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Models, searched (?search=), sorted (?sort=) and paged (?limit=&offset=)."""
        return super().list(request, *args, **kwargs)

    def filter_queryset(self, queryset: QuerySet[Model]) -> QuerySet[Model]:
        queryset = super().filter_queryset(queryset)
        if self.action != "list":
            return queryset
        search = check_query_value("search", self.request.query_params.get("search", ""))
        if len(search) > listing.MAX_SEARCH_CHARS:
            raise ServiceError(f"search: at most {listing.MAX_SEARCH_CHARS} characters")
        sort = listing.check_sort(self.request.query_params.get("sort"))
        return listing.models_matching(queryset, search, sort)

    def get_serializer_class(self) -> type:
        return ModelUpdateSerializer if self.action == "partial_update" else ModelSerializer

    def perform_create(self, serializer: ModelSerializer) -> None:
        data = serializer.validated_data
        serializer.instance = services.do_create_model(
            name=data["name"], description=data.get("description", ""), owner=self.request.user)

    @extend_schema(request=None, responses=AliasMoveSerializer(many=True))
    @action(detail=True, methods=["get"], url_path="alias-history")
    def alias_history(self, request: Request, name: str) -> Response:
        """Every alias move of this model, newest first."""
        model = self.get_object()
        moves = alias_moves(model)
        page = self.paginate_queryset(moves)
        return self.get_paginated_response(AliasMoveSerializer(page, many=True).data)


def alias_moves(model: Model, alias_name: str | None = None) -> QuerySet[AliasMove]:
    moves = AliasMove.objects.filter(model=model).select_related(
        "from_version", "to_version", "moved_by")
    return moves.filter(alias_name=alias_name) if alias_name else moves


class ModelScopedMixin:
    """Resolve the `model_name` URL part to a Model, 404 when unknown."""

    kwargs: dict[str, Any]

    def get_model(self) -> Model:
        if not hasattr(self, "_model"):
            self._model = get_object_or_404(Model, name=self.kwargs["model_name"])
        return self._model


class ModelVersionViewSet(ModelScopedMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                          viewsets.GenericViewSet):
    """Versions of a model: list, read, upload (multipart)."""

    permission_classes = [IsOperatorOrReadOnly]
    serializer_class = ModelVersionSerializer
    lookup_field = "number"
    lookup_value_regex = "[0-9]{1,9}"  # fits the integer column: longer is simply not found
    parser_classes = [MultiPartParser, FormParser]

    def get_queryset(self) -> QuerySet[ModelVersion]:
        return ModelVersion.objects.filter(model=self.get_model()).select_related(
            "model", "created_by")

    @extend_schema(request={"multipart/form-data": VersionUploadSerializer},
                   responses={201: ModelVersionSerializer, 400: ERROR, 409: ERROR, 413: ERROR})
    def create(self, request: Request, model_name: str) -> Response:
        """Upload a new version: streamed to storage, validated in a child process."""
        model = self.get_model()
        version = create_version_from_request(request, model)
        body = ModelVersionSerializer(version, context={"request": request}).data
        return Response(body, status=status.HTTP_201_CREATED)


def staging_upload_handler() -> StagingUploadHandler:
    return StagingUploadHandler(services.artifact_store(), settings.MAX_UPLOAD_BYTES)


def create_version_from_request(request: Any, model: Model,
                                handler: StagingUploadHandler | None = None) -> ModelVersion:
    """Stream the request's artifact to staging and hand it to the version service.

    `handler`: one the caller installed already (before a CSRF check read the body).
    """
    django_request = getattr(request, "_request", request)
    if handler is None:
        handler = staging_upload_handler()
        django_request.upload_handlers = [handler]
    try:
        data = request.POST if django_request is request else request.data
        upload = request.FILES.get(ARTIFACT_FIELD)
        if upload is None or handler.staging is None:
            raise ServiceError(f"the multipart field {ARTIFACT_FIELD!r} with the model file "
                               "is required")
        return services.do_create_version(
            model=model, staging=handler.staging,
            signature=services.parse_json_field(data.get("signature"), "signature", None),
            metadata=services.parse_json_field(data.get("metadata"), "metadata", {}),
            declared_format=data.get("format") or None, user=request.user,
            example_input=services.parse_json_field(data.get("example_input"), "example_input",
                                                    None),
            steps=services.parse_json_field(data.get("steps"), "steps", None),
            labels_file=None if handler.labels is None else bytes(handler.labels))
    finally:
        handler.discard()


class AliasViewSet(ModelScopedMixin, viewsets.GenericViewSet):
    """Aliases of a model: list, point at a version, delete, roll back, history."""

    permission_classes = [IsOperatorOrReadOnly]
    serializer_class = AliasSerializer
    lookup_field = "name"
    lookup_value_regex = "[-a-z0-9_]+"
    unpaged_actions = ("list",)  # PortalAutoSchema: documented as the plain list it is

    def get_queryset(self) -> QuerySet[Alias]:
        return Alias.objects.filter(model=self.get_model()).select_related("version")

    def list(self, request: Request, model_name: str) -> Response:
        """Every alias of this model (a few per model: not paged)."""
        return Response(AliasSerializer(self.get_queryset(), many=True).data)

    def retrieve(self, request: Request, model_name: str, name: str) -> Response:
        return Response(AliasSerializer(self.get_object()).data)

    @extend_schema(request=AliasMoveRequestSerializer,
                   responses={200: AliasSerializer, 400: ERROR, 404: ERROR})
    def update(self, request: Request, model_name: str, name: str) -> Response:
        """Point the alias at a version (creates the alias when new)."""
        body = AliasMoveRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        model = self.get_model()
        version = services.find_version(model, body.validated_data["version"])
        alias = services.do_move_alias(model=model, alias_name=name, version=version,
                                       user=request.user)
        return Response(AliasSerializer(alias).data)

    @extend_schema(responses={204: None, 404: ERROR})
    def destroy(self, request: Request, model_name: str, name: str) -> Response:
        services.do_delete_alias(model=self.get_model(), alias_name=name, user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses={200: AliasSerializer, 400: ERROR, 404: ERROR})
    @action(detail=True, methods=["post"])
    def rollback(self, request: Request, model_name: str, name: str) -> Response:
        """Move the alias back to the version it pointed at before its last move."""
        alias = services.do_rollback_alias(model=self.get_model(), alias_name=name,
                                           user=request.user)
        return Response(AliasSerializer(alias).data)

    @extend_schema(request=None, responses=AliasMoveSerializer(many=True))
    @action(detail=True, methods=["get"])
    def history(self, request: Request, model_name: str, name: str) -> Response:
        """Every move of this alias, newest first."""
        moves = alias_moves(self.get_model(), name)
        page = self.paginate_queryset(moves)
        return self.get_paginated_response(AliasMoveSerializer(page, many=True).data)
