"""Serving API routes, and the agent API under /api/agent/."""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import DefaultRouter

from serving import agent_api
from serving.api import views

router = DefaultRouter()
router.register("nodes", views.NodeViewSet, basename="node")
router.register("join-tokens", views.JoinTokenViewSet, basename="join-token")
router.register("deployments", views.DeploymentViewSet, basename="deployment")
router.register("replicas", views.ReplicaViewSet, basename="replica")
router.register("api-keys", views.ApiKeyViewSet, basename="api-key")

urlpatterns = [
    path("agent/register", agent_api.register, name="agent-register"),
    path("agent/heartbeat", agent_api.heartbeat, name="agent-heartbeat"),
    path("agent/deregister", agent_api.deregister, name="agent-deregister"),
    path("agent/artifacts/<str:sha256>", agent_api.artifact, name="agent-artifact"),
    path("", include(router.urls)),
]
