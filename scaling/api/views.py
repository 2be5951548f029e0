"""Scaling REST endpoints: a deployment's policy, and the scaling events."""

from __future__ import annotations

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.permissions import IsOperatorOrReadOnly
from scaling import services
from scaling.api.serializers import ScalingEventSerializer, ScalingPolicySerializer
from scaling.models import ScalingEvent, ScalingPolicy
from serving.models import Deployment

ERROR = OpenApiResponse(description='{"error": "..."}')


class ScalingPolicyView(APIView):
    """GET, PUT (create or replace; omitted fields take defaults), PATCH, DELETE."""

    permission_classes = [IsOperatorOrReadOnly]
    serializer_class = ScalingPolicySerializer

    def _deployment(self, name: str) -> Deployment:
        return get_object_or_404(Deployment, name=name, deleting=False)

    @extend_schema(responses={200: ScalingPolicySerializer, 404: ERROR})
    def get(self, request: Request, name: str) -> Response:
        policy = get_object_or_404(ScalingPolicy, deployment=self._deployment(name))
        return Response(ScalingPolicySerializer(policy).data)

    @extend_schema(request=ScalingPolicySerializer,
                   responses={200: ScalingPolicySerializer, 400: ERROR, 404: ERROR})
    def put(self, request: Request, name: str) -> Response:
        return self._write(request, name, partial=False)

    @extend_schema(request=ScalingPolicySerializer,
                   responses={200: ScalingPolicySerializer, 400: ERROR, 404: ERROR})
    def patch(self, request: Request, name: str) -> Response:
        return self._write(request, name, partial=True)

    @extend_schema(responses={204: None, 404: ERROR})
    def delete(self, request: Request, name: str) -> Response:
        if not services.do_clear_policy(self._deployment(name)):
            return Response({"error": f"{name} has no scaling policy"},
                            status=status.HTTP_404_NOT_FOUND)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _write(self, request: Request, name: str, partial: bool) -> Response:
        deployment = self._deployment(name)
        body = ScalingPolicySerializer(data=request.data, partial=partial)
        body.is_valid(raise_exception=True)
        fields = dict(body.validated_data)
        if not partial:  # a PUT replaces the whole policy: omitted fields get defaults
            defaults = ScalingPolicy()
            fields = {name: fields.get(name, getattr(defaults, name))
                      for name in services.POLICY_FIELDS}
        policy = services.do_set_policy(deployment, **fields)
        return Response(ScalingPolicySerializer(policy).data)


class ScalingEventViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin,
                          viewsets.GenericViewSet):
    """Every change the auto-scaler made, newest first, with its reason and inputs."""

    permission_classes = [IsOperatorOrReadOnly]
    serializer_class = ScalingEventSerializer
    queryset = ScalingEvent.objects.select_related("deployment")
    query_filters = {"deployment": "deployment__name"}
