"""The dashboards' pages and controls (thin: queries in dashboards.queries, writes in services)."""

from __future__ import annotations

from dashboards.views.access import access, key_create, key_revoke, token_create, token_revoke
from dashboards.views.charts import chart_series
from dashboards.views.deployments import (
    deployment_create,
    deployment_detail,
    deployment_list,
    deployment_policy,
    deployment_rollback,
    deployment_scale,
    deployment_traffic,
)
from dashboards.views.pages import fleet, node_drain, overview
from dashboards.views.playground import playground

__all__ = [
    "access",
    "chart_series",
    "deployment_create",
    "deployment_detail",
    "deployment_list",
    "deployment_policy",
    "deployment_rollback",
    "deployment_scale",
    "deployment_traffic",
    "fleet",
    "key_create",
    "key_revoke",
    "node_drain",
    "overview",
    "playground",
    "token_create",
    "token_revoke",
]
