"""The charts' history for a chosen time range (5 min, 1 h, 24 h), as JSON for the pages."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from dashboards import events, figures, history, queries
from dashboards.views.common import viewer_page
from serving.models import Deployment

CHARTS = ("fleet", "nodes", "deployment")


@viewer_page
def chart_series(request: HttpRequest) -> HttpResponse:
    """GET ?chart=fleet|nodes|deployment&range=5m|1h|24h[&deployment=NAME] ->
    {"range", "step_s", "window_s", "series"}; 400 with {"error"} on a bad choice."""
    chart, range_name = request.GET.get("chart", ""), request.GET.get("range", "")
    range_ = history.RANGES.get(range_name)
    if chart not in CHARTS or range_ is None:
        return JsonResponse({"error": f"chart must be one of {', '.join(CHARTS)} and range "
                                      f"one of {', '.join(history.RANGES)}"}, status=400)
    if chart == "deployment":
        name = request.GET.get("deployment", "")
        deployment = Deployment.objects.filter(name=name).first()
        if deployment is None:
            return JsonResponse({"error": f"no deployment named {name[:100]!r}"}, status=404)
        series: Any = _deployment(deployment, range_name)
    else:
        series = _fleet(range_name, per_node=chart == "nodes")
    return JsonResponse({"range": range_.name, "step_s": range_.step_s,
                         "window_s": range_.step_s * range_.samples, "series": series})


def _fleet(range_name: str, per_node: bool) -> dict[str, Any]:
    nodes = queries.fleet_nodes()
    histories = queries.node_histories([node.id for node in nodes], range_name)
    kinds = {node.id: {g.index: g.kind for g in node.gpus} for node in nodes}
    if per_node:
        return {str(node.id): figures.device_series(histories.get(node.id, []),
                                                    kinds[node.id]).to_dict()
                for node in nodes}
    has_gpu = any(kind == "gpu" for by_index in kinds.values() for kind in by_index.values())
    return figures.fleet_series(histories, history.RANGES[range_name].step_s, kinds,
                                "gpu" if has_gpu else "cpu").to_dict()


def _deployment(deployment: Deployment, range_name: str) -> dict[str, Any]:
    replicas = events.replica_rows([deployment.pk])[deployment.pk]
    series = queries.deployment_series(
        [deployment.pk], {r["id"]: r["version"] for r in replicas}, range_name
    ).get(deployment.pk)
    return series.to_dict() if series else {"t": []}
