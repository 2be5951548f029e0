"""Top-level routes: pages, admin, the management API, docs, health."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from swarm_portal import health

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="dashboards:overview"), name="home"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("api/auth/", include("swarm_portal.api_login")),
    path("api/gateway/", include("serving.gateway_api")),
    path("api/", include("registry.api.urls")),
    path("api/", include("serving.api.urls")),
    path("api/", include("scaling.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("", include("registry.urls")),
    path("", include("dashboards.urls")),
]
handler404 = "dashboards.views.errors.page_not_found"
handler403 = "dashboards.views.errors.permission_denied"
