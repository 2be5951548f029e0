"""Errors that services raise and every transport turns into a 4xx JSON body."""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal with an HTTP status and a message meant for the caller."""

    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class PayloadTooLarge(ServiceError):
    status_code = 413


class ServiceUnavailable(ServiceError):
    """Busy for now: the caller should retry after `retry_after_s` (sent as Retry-After)."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}
