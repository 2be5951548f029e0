"""The models list at scale: search, sort and one page of it (the page and the API share it)."""

from __future__ import annotations

from django.db.models import Count, Max, Q, QuerySet

from registry.models import Model
from swarm_portal.errors import ServiceError

# ?sort= value -> ORM ordering (ties broken by name, so pages never overlap).
SORTS = {
    "name": ("name",), "-name": ("-name",),
    "created": ("created_at", "name"), "-created": ("-created_at", "name"),
    "versions": ("version_count", "name"), "-versions": ("-version_count", "name"),
    "latest": ("latest_version", "name"), "-latest": ("-latest_version", "name"),
}
DEFAULT_SORT = "name"
MAX_SEARCH_CHARS = 100


def check_sort(sort: str | None) -> str:
    """Return a known sort key (DEFAULT_SORT when none is given), or raise a 400."""
    if not sort:
        return DEFAULT_SORT
    if sort not in SORTS:
        raise ServiceError(f"sort must be one of {', '.join(SORTS)}")
    return sort


def models_matching(models: QuerySet[Model], search: str = "",
                    sort: str = DEFAULT_SORT) -> QuerySet[Model]:
    """Return the models whose name or description contains `search`, in `sort` order.

    Annotates version_count and latest_version (the list shows both; one query).
    """
    search = search.strip()[:MAX_SEARCH_CHARS]
    if search:
        models = models.filter(Q(name__icontains=search) | Q(description__icontains=search))
    models = models.annotate(version_count=Count("versions", distinct=True))
    if "latest_version" not in models.query.annotations:
        models = models.annotate(latest_version=Max("versions__number"))
    return models.order_by(*SORTS[sort])
