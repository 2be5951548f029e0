"""Read pages: the overview and the fleet, and the fleet's one control (drain a node)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from dashboards import figures, history, queries
from dashboards.views.common import operator_action, run_action, viewer_page
from serving import services
from serving.models import Node


@viewer_page
def overview(request: HttpRequest) -> HttpResponse:
    nodes = queries.fleet_nodes()
    histories = queries.node_histories([node.id for node in nodes])
    summary = queries.summary(nodes, histories)
    kinds = {node.id: {g.index: g.kind for g in node.gpus} for node in nodes}
    context = {
        "summary": summary,
        "events": queries.recent_events(),
        "series": figures.fleet_series(histories, history.HISTORY_STEP_S, kinds,
                                       "gpu" if summary.gpus else "cpu").to_dict(),
        "seed": _figures_seed(nodes, histories),
        "device_kinds": queries.device_kinds(nodes),
    }
    template = ("dashboards/_summary.html" if request.GET.get("partial") == "summary"
                else "dashboards/overview.html")
    return render(request, template, context)


@viewer_page
def fleet(request: HttpRequest) -> HttpResponse:
    nodes = queries.fleet_nodes()
    histories = queries.node_histories([node.id for node in nodes])
    queries.with_replicas(nodes)
    context = {
        "nodes": nodes,
        "series": {node.id: figures.device_series(histories.get(node.id, []),
                                                  {g.index: g.kind for g in node.gpus}).to_dict()
                   for node in nodes},
        "seed": _figures_seed(nodes, histories),
    }
    template = ("dashboards/_fleet_nodes.html" if request.GET.get("partial") == "nodes"
                else "dashboards/fleet.html")
    return render(request, template, context)


@operator_action
def node_drain(request: HttpRequest, pk: int) -> HttpResponse:
    """Drain a node: no new replicas go there and its replicas move elsewhere."""
    node = get_object_or_404(Node, pk=pk)

    def drain() -> str:
        services.do_drain_node(node)
        return f"Node {node.name} is draining: its replicas move to other nodes."
    return run_action(request, drain, "dashboards:fleet")


def _figures_seed(nodes: list[queries.NodeRow],
                  histories: dict[int, list[figures.Sample]]) -> dict[str, object]:
    """Return the newest sample per node: the browser's first point for rates and totals."""
    return {str(node.id): histories[node.id][-1] for node in nodes if histories.get(node.id)}
