"""Scaling API routes: /api/deployments/{name}/policy/ and /api/scaling-events/."""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import DefaultRouter

from scaling.api import views

router = DefaultRouter()
router.register("scaling-events", views.ScalingEventViewSet, basename="scaling-event")

urlpatterns = [
    path("deployments/<slug:name>/policy/", views.ScalingPolicyView.as_view(),
         name="deployment-policy"),
    path("", include(router.urls)),
]
