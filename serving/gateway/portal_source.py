"""The gateway's link to the portal (`/api/gateway/...`): table, sessions, activations.

`PortalClient` is the TableSource, SessionAuth and Activator of a gateway that runs apart
from the portal (`swarm-gateway`). It is never on a request's path except for a session
the SessionCache has not seen. The table is polled with a conditional GET (a 304 costs the
portal one query); each new table is parsed off the event loop and saved atomically to
`table_cache_path`, so a gateway restarted while the portal is away serves its last table.
Failures raise (the TableRefresher keeps the last table and asks again 200 ms later); the
other calls fail closed (`allows`) or log and carry on (`activate`, `report_successes`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import httpx

from serving.gateway.refresh import SourceUnavailable
from serving.gateway.routes import RouteTable
from swarm_protocol.private_files import write_private

logger = logging.getLogger("serving.gateway.portal")
API_PREFIX = "/api/gateway"
_INSTANCE = re.compile(r"[A-Za-z0-9_.:-]{1,64}", re.ASCII)
# A keep-alive connection the portal closed just as we reused it: safe to send once more.
_STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# A portal that is starting, restarting or overloaded (anything else is a bug or setup).
_UNAVAILABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
LOG_EVERY_FAILURES = 60  # log the first failure of a streak, then one in this many


class PortalError(RuntimeError):
    """The portal did not answer, or answered something else than the contract says."""


class PortalUnavailable(PortalError, SourceUnavailable):
    """The portal cannot answer for now: a timeout, a refused or reset connection, a 5xx
    (it is starting or restarting). Retried, and logged without a traceback."""


class PortalRefused(PortalError):
    """The portal refused our token (401/403): a refusal, not an outage."""


def default_instance_id() -> str:
    """Return `<host>:<pid>`, cut to the 64 characters the portal accepts."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "gateway"
    return f"{host[:50]}:{os.getpid()}"


def _etag_of(table: RouteTable) -> str:
    """Return the ETag the portal sent with a table (its revision, quoted)."""
    return f'"{table.revision}"'


class PortalClient:
    """The gateway's link to the portal: table, sessions, activations, success reports."""

    def __init__(self, portal_url: str, token: str, *, uds_path: str | None = None,
                 table_cache_path: Path | None = None, instance_id: str | None = None,
                 timeout_s: float = 2.0) -> None:
        self.instance_id = instance_id or default_instance_id()
        if not _INSTANCE.fullmatch(self.instance_id):
            raise ValueError("instance_id must be 1 to 64 characters of A-Z a-z 0-9 _ . : -")
        self.table_cache_path = Path(table_cache_path) if table_cache_path else None
        # Host comes from portal_url even over a unix socket (ALLOWED_HOSTS checks it).
        transport = httpx.AsyncHTTPTransport(uds=uds_path) if uds_path else None
        self._client = httpx.AsyncClient(
            base_url=portal_url.rstrip("/") + API_PREFIX, transport=transport,
            headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s,
            follow_redirects=False, trust_env=False)
        self._etag: str | None = None  # of the table load() last returned
        self._pending: tuple[str, bytes | RouteTable] | None = None  # fetched, not loaded
        self._failures: dict[str, int] = {}
        # Where nodes behind NAT open their tunnel to this gateway (--tunnel-port): sent with
        # each poll, so the portal can list it to them (serving/services/reachability.py).
        self.tunnel_url: str | None = None

    # TableSource

    async def revision(self) -> str:
        """Return the ETag of the portal's table now (a conditional GET; keeps a new body).

        Before any table was loaded, a portal that cannot be reached (not one that refuses
        the token) yields the table saved at table_cache_path, if any; afterwards failures
        raise PortalError.
        """
        try:
            response = await self._get_table(self._etag)
        except PortalRefused:
            raise  # a revoked token must not start serving from the saved table
        except PortalError:
            if self._etag is None and self._pending is None:
                cached = await asyncio.to_thread(self.cached_table)
                if cached is not None:
                    logger.warning("the portal cannot be reached: serving the table saved "
                                   "at %s until it can", self.table_cache_path)
                    self._pending = (_etag_of(cached), cached)
                    return _etag_of(cached)
            raise
        if response.status_code == 304 and self._etag is not None:
            return self._etag
        etag = self._etag_header(response)
        self._pending = (etag, response.content)
        return etag

    async def load(self) -> RouteTable:
        """Return the table: the one revision() fetched, else a fresh one (full reload)."""
        if self._pending is None:
            response = await self._get_table(None)
            self._pending = (self._etag_header(response), response.content)
        etag, fetched = self._pending
        self._pending = None
        if isinstance(fetched, RouteTable):
            table = fetched
        else:
            table = await asyncio.to_thread(self._parse_and_save, fetched)
        self._etag = etag
        return table

    async def _get_table(self, etag: str | None) -> httpx.Response:
        headers = {"If-None-Match": etag} if etag else None
        params = {"instance": self.instance_id}
        if self.tunnel_url:
            params["tunnel"] = self.tunnel_url
        response = await self._request("GET", "/table", params=params, headers=headers)
        if response.status_code in (401, 403):
            raise PortalRefused(f"the portal refused the gateway token ({response.status_code})")
        if response.status_code >= 500:
            raise PortalUnavailable(f"the portal answered {response.status_code} for the "
                                    f"table: {response.text[:200]}")
        if response.status_code not in (200, 304):
            raise PortalError(f"the portal answered {response.status_code} for the table: "
                              f"{response.text[:200]}")
        return response

    @staticmethod
    def _etag_header(response: httpx.Response) -> str:
        etag: str | None = response.headers.get("etag")
        if response.status_code != 200 or not etag:
            raise PortalError(f"the portal answered {response.status_code} without a table")
        return etag

    def _parse_and_save(self, body: bytes) -> RouteTable:
        """Parse a table (in a worker thread: large tables take a while) and save it."""
        try:
            table = RouteTable.from_dict(json.loads(body))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PortalError(f"the portal sent a table that does not parse: {exc}") from exc
        if self.table_cache_path is not None:
            try:
                write_private(self.table_cache_path, body)
            except OSError:
                logger.exception("could not save the table to %s", self.table_cache_path)
        return table

    def cached_table(self) -> RouteTable | None:
        """Return the last table saved at table_cache_path (None when none or unreadable)."""
        if self.table_cache_path is None:
            return None
        try:
            return RouteTable.from_dict(json.loads(self.table_cache_path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            logger.exception("the table saved at %s cannot be read", self.table_cache_path)
            return None

    # SessionAuth, Activator, success reports

    async def allows(self, session_key: str, deployment: str) -> bool:
        """Return whether the portal session may call deployments; False when unsure."""
        try:
            response = await self._request("POST", "/sessions",
                                           json={"session_key": session_key})
            if response.status_code == 200:
                answer = response.json()
                return isinstance(answer, dict) and answer.get("allowed") is True
            self._failed("sessions", f"answered {response.status_code}")
        except (PortalError, ValueError) as exc:
            self._failed("sessions", str(exc))
        return False

    async def activate(self, deployment_id: int, held: int) -> None:
        """Ask the auto-scaler to start a replica (the portal sends the task); never raises."""
        await self._post_quietly("activations", {"deployment_id": deployment_id, "held": held})

    async def report_successes(self, latest_s_by_replica: dict[int, float],
                               keys_used_s: dict[int, float] | None = None) -> None:
        """Tell the portal when replicas last answered and API keys were last admitted
        (unix s); never raises."""
        if latest_s_by_replica or keys_used_s:
            body: dict[str, Any] = {
                "replicas": {str(pk): at_s for pk, at_s in latest_s_by_replica.items()}}
            if keys_used_s:
                body["keys"] = {str(pk): at_s for pk, at_s in keys_used_s.items()}
            await self._post_quietly("successes", body)

    async def _post_quietly(self, what: str, body: dict[str, Any]) -> None:
        try:
            response = await self._request("POST", f"/{what}", json=body)
        except PortalError as exc:
            self._failed(what, str(exc))
            return
        if response.status_code >= 300:
            self._failed(what, f"answered {response.status_code}: {response.text[:200]}")
        else:
            self._failures.pop(what, None)

    def _failed(self, what: str, why: str) -> None:
        count = self._failures[what] = self._failures.get(what, 0) + 1
        if count % LOG_EVERY_FAILURES == 1:
            logger.warning("portal %s failed (%d in a row): %s", what, count, why)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request (once more on a stale keep-alive connection); raise PortalError."""
        try:
            try:
                return await self._client.request(method, path, **kwargs)
            except _STALE_CONNECTION:
                return await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            kind = PortalUnavailable if isinstance(exc, _UNAVAILABLE) else PortalError
            raise kind(f"{method} {API_PREFIX}{path}: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the connections to the portal."""
        await self._client.aclose()
