"""Registry API routes, nested under /api/models/{name}/."""

from __future__ import annotations

from django.urls import include, path, register_converter
from rest_framework.routers import DefaultRouter, SimpleRouter

from registry.api import views
from registry.downloads import artifact_download


class VersionNumberConverter:
    """A version number that fits the integer column: a longer one is simply not found."""

    regex = "[0-9]{1,9}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(VersionNumberConverter, "version_number")

router = DefaultRouter()
router.register("models", views.ModelViewSet, basename="model")

nested = SimpleRouter()
nested.register("versions", views.ModelVersionViewSet, basename="model-version")
nested.register("aliases", views.AliasViewSet, basename="model-alias")

urlpatterns = [
    path("models/<str:model_name>/versions/<version_number:number>/artifact", artifact_download,
         name="artifact-download"),
    path("models/<str:model_name>/", include(nested.urls)),
    path("", include(router.urls)),
]
