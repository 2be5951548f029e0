"""Serving REST endpoints: nodes, join tokens, deployments, replicas."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from django.db.models import Count, Q, QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from registry.models import Model
from registry.permissions import IsOperatorOrReadOnly
from serving import live, replica_logs, services
from serving.api.serializers import (
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    DeploymentCreateSerializer,
    DeploymentSerializer,
    DeploymentUpdateSerializer,
    JoinTokenCreatedSerializer,
    JoinTokenSerializer,
    NodeSerializer,
    ReplicaLogsSerializer,
    ReplicaSerializer,
    RevisionSerializer,
    RollbackSerializer,
    ScaleSerializer,
)
from serving.models import ApiKey, Deployment, JoinToken, Node, Replica, ReplicaState
from swarm_portal.api import bounded_int
from swarm_portal.errors import ServiceUnavailable

ERROR = OpenApiResponse(description='{"error": "..."}')
MAX_LOG_SEQ = 9_999_999_999  # what bounded_int reads (10 digits): centuries of output


class NodeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin,
                  viewsets.GenericViewSet):
    """GPU servers: list with live figures, drain, remove."""

    permission_classes = [IsOperatorOrReadOnly]
    serializer_class = NodeSerializer
    queryset = Node.objects.prefetch_related("gpus")

    def get_serializer_context(self) -> dict:
        context = super().get_serializer_context()
        context["figures"] = live.nodes_figures(list(Node.objects.values_list("pk", flat=True)))
        return context

    def perform_destroy(self, instance: Node) -> None:
        services.do_remove_node(instance)

    @extend_schema(request=None, responses={200: NodeSerializer})
    @action(detail=True, methods=["post"])
    def drain(self, request: Request, pk: str) -> Response:
        """Stop placing replicas here and move the ones it has."""
        node = self.get_object()
        services.do_drain_node(node)
        node.refresh_from_db()
        return Response(self.get_serializer(node).data)


class JoinTokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin,
                       mixins.CreateModelMixin, viewsets.GenericViewSet):
    """Join tokens for new GPU servers: the secret is shown once, at creation."""

    permission_classes = [IsOperatorOrReadOnly]
    serializer_class = JoinTokenSerializer
    queryset = JoinToken.objects.select_related("created_by")

    @extend_schema(responses={201: JoinTokenCreatedSerializer, 400: ERROR})
    def create(self, request: Request) -> Response:
        body = JoinTokenSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        hours = body.validated_data.get("expires_in_hours")
        token, secret = services.do_create_join_token(
            name=body.validated_data["name"], user=request.user,
            expires_in=timedelta(hours=hours) if hours else None,
            uses=body.validated_data.get("uses"))
        token.token = secret
        return Response(JoinTokenCreatedSerializer(token).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: JoinTokenSerializer})
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str) -> Response:
        token = self.get_object()
        services.do_revoke_join_token(token)
        token.refresh_from_db()
        return Response(JoinTokenSerializer(token).data)


class DeploymentViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin,
                        mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """Deployments: create, change versions/weights/settings, scale, roll back, delete."""

    permission_classes = [IsOperatorOrReadOnly]
    serializer_class = DeploymentSerializer
    lookup_field = "name"
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def _reply(self, name: str, status_code: int = status.HTTP_200_OK) -> Response:
        return Response(self.get_serializer(self.get_queryset().get(name=name)).data,
                        status=status_code)

    @extend_schema(request=DeploymentUpdateSerializer,
                   responses={200: DeploymentSerializer, 400: ERROR})
    def partial_update(self, request: Request, name: str) -> Response:
        """Change the version (or alias), the canary split or settings: a new revision."""
        body = DeploymentUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        changes = dict(body.validated_data)
        if "alias" in changes:
            changes["alias_name"] = changes.pop("alias")
        # A change to what it already is records no revision (do_update_deployment).
        services.do_update_deployment(self.get_object(), changes, request.user,
                                      reason="changed: " + ", ".join(sorted(changes)))
        return self._reply(name)

    @extend_schema(request=None, responses=RevisionSerializer(many=True))
    @action(detail=True, methods=["get"])
    def revisions(self, request: Request, name: str) -> Response:
        """Every revision of this deployment, newest first."""
        revisions = self.get_object().revisions.select_related("created_by")
        page = self.paginate_queryset(revisions)
        return self.get_paginated_response(RevisionSerializer(page, many=True).data)

    @extend_schema(request=RollbackSerializer,
                   responses={200: DeploymentSerializer, 404: ERROR})
    @action(detail=True, methods=["post"])
    def rollback(self, request: Request, name: str) -> Response:
        """Restore an earlier revision's versions, weights and settings."""
        body = RollbackSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        services.do_rollback_deployment(self.get_object(), body.validated_data["revision"],
                                        request.user)
        return self._reply(name)

    def get_queryset(self) -> QuerySet[Deployment]:
        ready = Count("replica_set", filter=Q(replica_set__state=ReplicaState.READY,
                                              replica_set__desired=True))
        return Deployment.objects.select_related("model", "version").annotate(
            ready_replicas=ready)

    @extend_schema(request=DeploymentCreateSerializer,
                   responses={201: DeploymentSerializer, 400: ERROR, 409: ERROR})
    def create(self, request: Request) -> Response:
        body = DeploymentCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        model = get_object_or_404(Model, name=data.pop("model"))
        deployment = services.do_create_deployment(
            name=data.pop("name"), model=model, version_number=data.pop("version", None),
            alias_name=data.pop("alias"), user=request.user, **data)
        return self._reply(deployment.name, status.HTTP_201_CREATED)

    def perform_destroy(self, instance: Deployment) -> None:
        services.do_delete_deployment(instance)

    @extend_schema(request=ScaleSerializer,
                   responses={200: DeploymentSerializer, 400: ERROR, 409: ERROR})
    @action(detail=True, methods=["post"])
    def scale(self, request: Request, name: str) -> Response:
        """Set the number of replicas by hand (409 under an enabled policy, unless
        pause_policy turns it off)."""
        body = ScaleSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        services.do_scale_deployment(self.get_object(), body.validated_data["replicas"],
                                     request.user,
                                     pause_policy=body.validated_data["pause_policy"])
        return self._reply(name)


class ReplicaViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Replicas (read-only): where each runs and in which state. ?deployment=name filters."""

    serializer_class = ReplicaSerializer
    queryset = Replica.objects.select_related("deployment", "version", "node")
    query_filters = {"deployment": "deployment__name"}

    def get_serializer(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], Replica | list):  # a row or a page: add live facts
            rows = args[0] if isinstance(args[0], list) else [args[0]]
            kwargs["context"] = {**self.get_serializer_context(),
                                 "facts": replica_logs.replica_facts(rows, time.time())}
        return super().get_serializer(*args, **kwargs)

    @extend_schema(parameters=[
        OpenApiParameter("after", {"type": "integer", "minimum": 0, "maximum": MAX_LOG_SEQ},
                         description="only lines after this seq (the last answer's `next`); "
                                     "without it, the last `limit` lines"),
        OpenApiParameter("limit", {"type": "integer", "minimum": 1,
                                   "maximum": replica_logs.MAX_READ_LINES},
                         description=f"at most this many lines (default "
                                     f"{replica_logs.DEFAULT_READ_LINES})")],
        responses={200: ReplicaLogsSerializer, 400: ERROR, 404: ERROR, 503: ERROR})
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, pk: str) -> Response:
        """The replica's recent output, pushed by its agent: follow with ?after=<next>."""
        replica = self.get_object()
        after = bounded_int(request, "after", -1, 0, MAX_LOG_SEQ)
        limit = bounded_int(request, "limit", replica_logs.DEFAULT_READ_LINES, 1,
                            replica_logs.MAX_READ_LINES)
        try:
            found = replica_logs.read_lines(replica.pk, None if after < 0 else after, limit)
        except live.CacheUnavailable:
            raise ServiceUnavailable("the portal's cache is unavailable; retry", 2) from None
        return Response(found)


class ApiKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """API keys for /v2 clients: the secret is shown once, at creation."""

    permission_classes = [IsOperatorOrReadOnly]
    serializer_class = ApiKeySerializer
    queryset = ApiKey.objects.select_related("created_by").prefetch_related("deployments")

    @extend_schema(request=ApiKeyCreateSerializer,
                   responses={201: ApiKeyCreatedSerializer, 400: ERROR})
    def create(self, request: Request) -> Response:
        body = ApiKeyCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        hours = data.get("expires_in_hours")
        key, secret = services.do_create_api_key(
            name=data["name"], user=request.user, deployments=data.get("deployments"),
            expires_in=timedelta(hours=hours) if hours else None,
            rate_limit_rps=data.get("rate_limit_rps"), burst=data["burst"],
            tokens_per_minute=data.get("rate_limit_tokens_per_minute"))
        key.key = secret
        return Response(ApiKeyCreatedSerializer(key).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: ApiKeySerializer})
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str) -> Response:
        key = self.get_object()
        services.do_revoke_api_key(key)
        key.refresh_from_db()
        return Response(ApiKeySerializer(key).data)
