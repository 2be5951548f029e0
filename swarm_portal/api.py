"""DRF glue shared by every app: one error body shape, and one gate for each kind of input.

Errors: {"error": "...", "fields": {...}}. Bodies: JSON only (BoundedJSONParser), objects
whose keys the serializer knows (StrictFieldsMixin). Query strings: limit/offset parsed
strictly within bounds (BoundedPagination), every value free of control characters and
bounded in length, filters declared per view (QueryFilters).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db.models import QuerySet
from rest_framework import serializers, status
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.filters import BaseFilterBackend
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from swarm_portal.errors import PayloadTooLarge, ServiceError

MAX_JSON_DEPTH = 16  # our deepest real body is 3 levels; recursion errors start near 1,000
MAX_QUERY_VALUE_CHARS = 200
MAX_PAGE_LIMIT = 1000
MAX_PAGE_OFFSET = 1_000_000_000
_DIGITS = re.compile(r"[0-9]{1,10}")


def _first_message(detail: Any) -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            inner = _first_message(value)
            return inner if key == "non_field_errors" else f"{key}: {inner}"
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Return every API error as {"error": message}, with field details when there are any."""
    if isinstance(exc, RequestDataTooBig):  # Django's own cap, met when DRF reads the body
        limit_bytes = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return Response({"error": f"the body is larger than {limit_bytes} bytes"},
                        status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, ServiceError):
        return Response({"error": exc.message}, status=exc.status_code,
                        headers=getattr(exc, "headers", None))
    # Imported here: rest_framework.views reads DEFAULT_PARSER_CLASSES, which names this
    # module, when it is first imported; a module-level import made a cycle whenever this
    # module was imported before DRF's views (the Celery worker did, and failed).
    from rest_framework.views import exception_handler as drf_exception_handler

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, ValidationError):
        response.data = {"error": _first_message(exc.detail), "fields": exc.detail}
        response.status_code = status.HTTP_400_BAD_REQUEST
    elif isinstance(response.data, dict) and "detail" in response.data:
        response.data = {"error": str(response.data["detail"])}
    return response


# --- bodies ------------------------------------------------------------------------------

def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ParseError(f"JSON parse error - the number {text[:40]} is too large")
    return value


def json_depth(value: Any) -> int:
    """Return how deeply lists and objects nest in `value` (iteratively: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any] = ()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


class BoundedJSONParser(JSONParser):
    """JSON within the body size limit, nesting depth and float range; a 4xx otherwise."""

    def parse(self, stream: Any, media_type: str | None = None,
              parser_context: dict[str, Any] | None = None) -> Any:
        limit_bytes = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read(limit_bytes + 1) if stream is not None else b""
        if len(raw) > limit_bytes:
            raise PayloadTooLarge(f"the JSON body is larger than {limit_bytes} bytes")
        try:
            data = json.loads(raw, parse_float=_finite_float, parse_constant=self._refuse)
        except RecursionError:
            raise ParseError(f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)"
                             ) from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise ParseError(f"JSON parse error - {exc}") from None
        if json_depth(data) > MAX_JSON_DEPTH:
            raise ParseError(f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
        return data

    @staticmethod
    def _refuse(name: str) -> None:
        raise ParseError(f"JSON parse error - {name} is not a number JSON allows")


class StrictFieldsMixin:
    """Refuse keys the serializer does not accept, instead of silently dropping them."""

    fields: Mapping[str, serializers.Field]

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            writable = {name for name, field in self.fields.items() if not field.read_only}
            refused = {key: [self._why(key)] for key in data if key not in writable}
            if refused:
                raise ValidationError(refused)
        return super().to_internal_value(data)  # type: ignore[misc]

    def _why(self, key: str) -> str:
        return "read-only field" if key in self.fields else "unknown field"


class StrictSerializer(StrictFieldsMixin, serializers.Serializer):
    """A request body of known fields only."""


class StrictModelSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """A model's request body of known, writable fields only."""


# --- query strings -----------------------------------------------------------------------

def check_query_value(name: str, value: str) -> str:
    """Return `value`, or raise a 400 if it holds control characters or is too long."""
    if len(value) > MAX_QUERY_VALUE_CHARS:
        raise ValidationError({name: f"longer than {MAX_QUERY_VALUE_CHARS} characters"})
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in value):
        raise ValidationError({name: "control characters are not allowed"})
    return value


def check_query_params(request: Request) -> None:
    """Refuse any query parameter (name or value) with control characters or too long."""
    for name, values in request.query_params.lists():
        check_query_value("query parameter name", name)
        for value in values:
            check_query_value(name, value)


def bounded_int(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    """Return a query parameter as an integer in [minimum, maximum]; a 400 otherwise."""
    text = request.query_params.get(name)
    if text is None:
        return default
    if not _DIGITS.fullmatch(text) or not minimum <= int(text) <= maximum:
        raise ValidationError({name: f"must be a whole number from {minimum} to {maximum}"})
    return int(text)


class BoundedPagination(LimitOffsetPagination):
    """limit/offset pagination that refuses what it cannot honour instead of guessing."""

    max_limit = MAX_PAGE_LIMIT

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> Any:
        check_query_params(request)
        return super().paginate_queryset(queryset, request, view)

    def get_limit(self, request: Request) -> int:
        return bounded_int(request, self.limit_query_param, self.default_limit or 100, 1,
                           MAX_PAGE_LIMIT)

    def get_offset(self, request: Request) -> int:
        return bounded_int(request, self.offset_query_param, 0, 0, MAX_PAGE_OFFSET)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        bounds = {self.limit_query_param: (1, MAX_PAGE_LIMIT),
                  self.offset_query_param: (0, MAX_PAGE_OFFSET)}
        for parameter in parameters:
            minimum, maximum = bounds[parameter["name"]]
            parameter["schema"].update(minimum=minimum, maximum=maximum)
        return parameters


class QueryFilters(BaseFilterBackend):
    """Exact filters a view declares as `query_filters = {"param": "orm__lookup"}`.

    It also refuses control characters and over-long values in any query parameter, so
    every list and detail endpoint shares one check (PostgreSQL refuses NUL with a 500).
    """

    def filter_queryset(self, request: Request, queryset: QuerySet, view: Any) -> QuerySet:
        check_query_params(request)
        for name, lookup in getattr(view, "query_filters", {}).items():
            value = request.query_params.get(name)
            if value:
                queryset = queryset.filter(**{lookup: value})
        return queryset

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        if getattr(view, "action", None) not in ("list", None):
            return []
        return [{"name": name, "required": False, "in": "query",
                 "description": f"only those whose {lookup.replace('__', ' ')} is this",
                 "schema": {"type": "string", "maxLength": MAX_QUERY_VALUE_CHARS,
                            "pattern": r"^[^\x00-\x1f\x7f]*$"}}
                for name, lookup in getattr(view, "query_filters", {}).items()]
