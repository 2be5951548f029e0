"""Who may call a deployment: API keys from the routing table, or a cached portal session."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence

from serving.gateway.limits import (
    MAX_CREDENTIAL_BYTES,
    MAX_HEADERS_TOTAL_BYTES,
    credential_fits,
    header_refusal,
)
from serving.gateway.responses import Response, error
from serving.gateway.routes import ApiKeyRoute, SessionAuth

SESSION_COOKIE = b"sessionid"
MAX_CACHED_DIGESTS = 10_000
# The deployment a session is asked about when the path names none we serve: one entry per
# session, not one per name a client makes up.
ANY_DEPLOYMENT = ""
_CHALLENGE = [(b"www-authenticate", b"Bearer")]


class Rejected(Exception):
    """The caller may not make this request; `response` says why (401/403/503)."""

    def __init__(self, response: Response, unknown_key: bool = False) -> None:
        super().__init__(response.status)
        self.response = response
        self.unknown_key = unknown_key  # a key this table lacks: it may be a new one


def _unauthorized(message: str) -> Rejected:
    return Rejected(error(401, message, _CHALLENGE))


def check_credential(value: bytes | str, what: str) -> None:
    """Refuse (401) a credential too long to be ours, before any cache or lookup sees it."""
    if not credential_fits(value):
        raise _unauthorized(f"the {what} is longer than {MAX_CREDENTIAL_BYTES} bytes")


def credentials(headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None]:
    """Return the Authorization and Cookie header values (None when absent); raise
    Rejected (431) when the headers are too long in all."""
    authorization = cookie = None
    # Counted here, in the loop every request already makes, rather than in one more.
    total_bytes = 0
    for name, value in headers:
        total_bytes += len(name) + len(value)
        if name == b"authorization":
            authorization = value
        elif name == b"cookie":
            cookie = value
    if total_bytes > MAX_HEADERS_TOTAL_BYTES:
        raise Rejected(header_refusal(headers))
    return authorization, cookie


def session_key(cookie: bytes) -> str | None:
    """Return the portal session key in a Cookie header, if any."""
    for part in cookie.split(b";"):
        name, _, value = part.strip().partition(b"=")
        if name == SESSION_COOKIE and value:
            return value.decode("latin-1")
    return None


def key_digest(authorization: bytes) -> str:
    """Return the sha256 hex digest of a `Bearer <key>` value; raise Rejected if malformed."""
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise _unauthorized("the Authorization header must be 'Bearer <API key>'")
    return hashlib.sha256(token).hexdigest()


class SessionCache:
    """Remembers SessionAuth answers for a few seconds; one lookup per question at a time.

    Refusals live in a smaller cache of their own, so a flood of made-up session keys
    (each refused) can only churn that one, never push out the sessions that are allowed.
    """

    def __init__(self, session_auth: SessionAuth, clock: Callable[[], float] = time.monotonic,
                 allowed_ttl_s: float = 5.0, denied_ttl_s: float = 2.0,
                 max_entries: int = 10_000, max_denied_entries: int = 1_000) -> None:
        self._session_auth = session_auth
        self._clock = clock
        self._ttl_s = {True: allowed_ttl_s, False: denied_ttl_s}
        self._max_entries = {True: max_entries, False: max_denied_entries}
        self._answers: dict[bool, dict[tuple[str, str], float]] = {True: {}, False: {}}
        self._pending: dict[tuple[str, str], asyncio.Future[bool]] = {}

    def sizes(self) -> dict[str, int]:
        """Return how many answers are cached, allowed and denied."""
        return {"sessions_allowed": len(self._answers[True]),
                "sessions_denied": len(self._answers[False])}

    async def allows(self, session: str, deployment: str) -> bool:
        """Return whether the session may call the deployment (cached)."""
        question = (session, deployment)
        now_s = self._clock()
        for allowed, answers in self._answers.items():
            until_s = answers.get(question)
            if until_s is not None and until_s > now_s:
                return allowed
        pending = self._pending.get(question)
        if pending is None:
            # A burst of requests from one browser asks the database once, not N times.
            pending = asyncio.ensure_future(self._ask(question))
            self._pending[question] = pending
        return await asyncio.shield(pending)

    async def _ask(self, question: tuple[str, str]) -> bool:
        try:
            allowed = bool(await self._session_auth.allows(*question))
        finally:
            self._pending.pop(question, None)
        answers = self._answers[allowed]
        if len(answers) >= self._max_entries[allowed]:
            answers.clear()  # crude, but bounded; a refill costs one lookup per session
        answers[question] = self._clock() + self._ttl_s[allowed]
        self._answers[not allowed].pop(question, None)
        return allowed


class Authenticator:
    """Decide who is calling a deployment: an API key, a portal session, or nobody."""

    def __init__(self, sessions: SessionCache | None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._sessions = sessions
        self._wall_clock = wall_clock
        # Clients resend the same header on every request: hash each one once. Only
        # headers that matched a key are kept, so made-up ones cannot fill it.
        self._digests: dict[bytes, str] = {}

    def sizes(self) -> dict[str, int]:
        """Return the sizes of what authentication caches."""
        sizes = {"key_digests": len(self._digests)}
        if self._sessions is not None:
            sizes.update(self._sessions.sizes())
        return sizes

    async def authorize(self, api_keys: Mapping[str, ApiKeyRoute],
                        headers: Sequence[tuple[bytes, bytes]],
                        deployment: str, known: bool = True) -> ApiKeyRoute | None:
        """Return the caller's key (None for a session); raise Rejected when not allowed.

        `known` is False when no deployment of that name is served: the answer is then
        only about who is calling, and nothing is cached under the made-up name.
        """
        authorization, cookie = credentials(headers)
        if authorization is None:
            session = session_key(cookie) if cookie is not None else None
            if session is None or self._sessions is None:
                raise _unauthorized("missing API key: send 'Authorization: Bearer <API key>'")
            check_credential(session, "session cookie")
            await self._check_session(session, deployment if known else ANY_DEPLOYMENT,
                                      deployment)
            return None
        key = self._key(api_keys, authorization)
        if key.expires_at_s is not None and self._wall_clock() >= key.expires_at_s:
            raise _unauthorized("the API key has expired")
        if key.deployments is not None and deployment not in key.deployments:
            raise Rejected(error(403, f"this API key may not call {deployment!r}"))
        return key

    def _key(self, api_keys: Mapping[str, ApiKeyRoute], authorization: bytes) -> ApiKeyRoute:
        """Return the table's key for an Authorization header; raise Rejected if none."""
        check_credential(authorization, "Authorization header")
        digest = self._digests.get(authorization)
        if digest is None:
            digest = key_digest(authorization)
            if digest in api_keys:
                if len(self._digests) >= MAX_CACHED_DIGESTS:
                    self._digests.clear()
                self._digests[authorization] = digest
        key = api_keys.get(digest)
        if key is None:
            raise Rejected(error(401, "unknown API key", _CHALLENGE), unknown_key=True)
        return key

    async def _check_session(self, session: str, asked: str, deployment: str) -> None:
        assert self._sessions is not None
        try:
            allowed = await self._sessions.allows(session, asked)
        except Exception as exc:
            raise Rejected(error(503, "cannot check the session now",
                                 [(b"retry-after", b"1")])) from exc
        if not allowed:
            # SessionAuth cannot tell "not logged in" from "not allowed": 401 asks to log in.
            raise _unauthorized(f"the session may not call {deployment!r}; log in or send "
                                "an API key")
