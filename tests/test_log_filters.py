"""django.request does not log an ERROR per deliberate 503 (an outage the callers ride out)."""

from __future__ import annotations

import logging

from django.http import HttpResponse
from django.test import RequestFactory
from django.utils.log import log_response


def test_deliberate_503s_are_not_logged_but_500s_are(caplog) -> None:
    request = RequestFactory().get("/api/gateway/table")
    with caplog.at_level(logging.WARNING, logger="django.request"):
        log_response("Service Unavailable: %s", request.path, response=HttpResponse(status=503),
                     request=request)
        log_response("Internal Server Error: %s", request.path,
                     response=HttpResponse(status=500), request=request)
    messages = [record.getMessage() for record in caplog.records
                if record.name == "django.request"]
    assert messages == ["Internal Server Error: /api/gateway/table"]
