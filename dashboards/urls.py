"""Dashboard pages and their controls."""

from __future__ import annotations

from django.urls import path

from dashboards import views

app_name = "dashboards"
urlpatterns = [
    path("overview/", views.overview, name="overview"),
    path("fleet/", views.fleet, name="fleet"),
    path("charts/", views.chart_series, name="chart-series"),
    path("fleet/nodes/<int:pk>/drain/", views.node_drain, name="node-drain"),
    path("deployments/", views.deployment_list, name="deployment-list"),
    path("deployments/new/", views.deployment_create, name="deployment-create"),
    path("deployments/<slug:name>/", views.deployment_detail, name="deployment-detail"),
    path("deployments/<slug:name>/scale/", views.deployment_scale, name="deployment-scale"),
    path("deployments/<slug:name>/traffic/", views.deployment_traffic,
         name="deployment-traffic"),
    path("deployments/<slug:name>/rollback/", views.deployment_rollback,
         name="deployment-rollback"),
    path("deployments/<slug:name>/policy/", views.deployment_policy, name="deployment-policy"),
    path("access/", views.access, name="access"),
    path("access/keys/", views.key_create, name="key-create"),
    path("access/keys/<int:pk>/revoke/", views.key_revoke, name="key-revoke"),
    path("access/tokens/", views.token_create, name="token-create"),
    path("access/tokens/<int:pk>/revoke/", views.token_revoke, name="token-revoke"),
    path("playground/", views.playground, name="playground"),
]
