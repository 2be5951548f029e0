"""Logging filters set in settings.LOGGING."""

from __future__ import annotations

import logging


class RetryableUnavailable(logging.Filter):
    """Drop django.request's line for a 503 answered on purpose (not from an exception).

    Our 503s are the designed reaction to an outage or a full queue that the caller rides
    out with Retry-After (Redis or the database away: agents and gateways retry and keep
    serving), and the code that notices the outage logs it once. Django would otherwise log
    an ERROR per request: about ten a second per gateway and per agent for as long as the
    outage lasts.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "status_code", None) != 503 or record.exc_info is not None
