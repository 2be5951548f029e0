"""Registry API routes, nested under /api/models/{name}/."""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import DefaultRouter, SimpleRouter

from registry.api import views
from registry.downloads import artifact_download

router = DefaultRouter()
router.register("models", views.ModelViewSet, basename="model")

nested = SimpleRouter()
nested.register("versions", views.ModelVersionViewSet, basename="model-version")
nested.register("aliases", views.AliasViewSet, basename="model-alias")

urlpatterns = [
    path("models/<str:model_name>/versions/<int:number>/artifact", artifact_download,
         name="artifact-download"),
    path("models/<str:model_name>/", include(nested.urls)),
    path("", include(router.urls)),
]
