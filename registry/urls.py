"""Registry pages."""

from __future__ import annotations

from django.urls import path

from registry import views

app_name = "registry"
urlpatterns = [
    path("models/", views.model_list, name="model-list"),
    path("models/new/", views.model_create, name="model-create"),
    path("models/<slug:name>/", views.model_detail, name="model-detail"),
    path("models/<slug:name>/upload/", views.version_upload, name="version-upload"),
    path("models/<slug:name>/aliases/", views.alias_move, name="alias-move"),
    path("models/<slug:name>/aliases/<slug:alias>/rollback/", views.alias_rollback,
         name="alias-rollback"),
]
