"""One HTTP client for the portal: every failure becomes one readable line and an exit code.

Exit codes (also in `swarm --help`): 0 done, 1 usage or client-side error, 2 refused by the
portal (a 4xx answer), 3 the portal failed or could not be reached (5xx, network, timeout).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import httpx
import typer

from swarm_cli import config

EXIT_USAGE, EXIT_REFUSED, EXIT_UNAVAILABLE = 1, 2, 3
TIMEOUT_S = 30.0
MAX_MESSAGE_CHARS = 500  # one line stays one readable line, whatever the server sent


def fail(message: str, exit_code: int = EXIT_USAGE) -> NoReturn:
    """Print `swarm: error: message` on one stderr line and exit with `exit_code`."""
    line = " ".join(str(message).split())[:MAX_MESSAGE_CHARS]
    print(f"swarm: error: {line}", file=sys.stderr)
    raise typer.Exit(exit_code)


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "no message"
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else response.reason_phrase or str(body)


def decode(response: httpx.Response) -> Any:
    """Return a 2xx answer's JSON (None when empty); fail with the server's message otherwise."""
    code = response.status_code
    if code >= 500:
        fail(f"the portal failed ({code}): {_server_message(response)}", EXIT_UNAVAILABLE)
    if code >= 400:
        hint = " (run `swarm login URL`)" if code == 401 else ""
        fail(f"refused ({code}): {_server_message(response)}{hint}", EXIT_REFUSED)
    if code >= 300:
        where = response.headers.get("location", "?")
        fail(f"unexpected redirect ({code}) to {where}: is this a Swarm Portal URL?",
             EXIT_UNAVAILABLE)
    if code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        fail(f"the portal answered {code} with something that is not JSON: is this a Swarm "
             "Portal URL?", EXIT_UNAVAILABLE)


class Client:
    """Requests to one portal with one credential (`Token` for the API, `Bearer` for /v2)."""

    def __init__(self, url: str, token: str | None = None, scheme: str = "Token",
                 timeout_s: float = TIMEOUT_S) -> None:
        headers = {"Authorization": f"{scheme} {token}"} if token else {}
        self.url = url
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return its decoded JSON; any failure exits (see `decode`)."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            fail(f"{self.url}: no answer in time ({method} {path})", EXIT_UNAVAILABLE)
        except httpx.TransportError as exc:
            fail(f"cannot reach {self.url}: {exc or type(exc).__name__}", EXIT_UNAVAILABLE)
        return decode(response)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items()
                                                 if v is not None})

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def list_all(self, path: str, limit: int = 1000, **params: Any) -> list[dict[str, Any]]:
        """Return every row of a paged list endpoint (or a plain list endpoint's answer)."""
        return list(self.iter_rows(path, limit, **params))

    def iter_rows(self, path: str, limit: int = 1000, **params: Any) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self.get(path, limit=limit, offset=offset, **params)
            if isinstance(page, list):  # a small list the API answers whole
                yield from page
                return
            rows = page.get("results", [])
            yield from rows
            offset += len(rows)
            if not rows or offset >= page.get("count", 0):
                return


def api() -> Client:
    """Return a client for the configured portal and token; exit 1 when there is none."""
    try:
        current = config.load()
    except config.ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    return Client(current.url, current.token)
