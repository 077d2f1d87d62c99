"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time.

Admin routes are denied by default: with no admin-scoped key configured, nobody gets in.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine, Mapping
from typing import Annotated, Any

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ForbiddenError, UnauthorizedError
from service.settings import AuthSettings, Scope


class KeyRing:
    def __init__(self, settings: AuthSettings) -> None:
        self._keys = [
            (k.name, k.key.get_secret_value().encode(), frozenset(k.scopes))
            for k in settings.api_keys
        ]
        self.require_predict_key = settings.require_predict_key
        self.require_feedback_key = settings.require_feedback_key

    def identify(self, presented: str | None) -> tuple[str, frozenset[Scope]] | None:
        """The matching key's name and scopes, or None. Every key is compared, always,
        so the time taken does not reveal which key (or how much of one) matched."""
        if not presented:
            return None
        candidate = presented.encode()
        found: tuple[str, frozenset[Scope]] | None = None
        for name, secret, scopes in self._keys:
            if hmac.compare_digest(candidate, secret) and found is None:
                found = (name, scopes)
        return found

    def check(self, presented: str | None, scope: Scope) -> str:
        """The key holder's name if the key grants `scope`; else 401/403."""
        identity = self.identify(presented)
        if identity is None:
            raise UnauthorizedError(
                "missing or unknown API key", headers={"WWW-Authenticate": "Bearer"}
            )
        name, scopes = identity
        if scope not in scopes:
            raise ForbiddenError(f"this key may not perform {scope.value} operations")
        return name


def bearer_or_api_key(headers: Mapping[str, str]) -> str | None:
    """The key from `Authorization: Bearer KEY` or `X-API-Key: KEY` (lower-case names).

    An `Authorization` header, when sent, decides alone: one that is not a bearer key
    presents no key, so a malformed credential is refused even beside a valid `X-API-Key`.
    """
    header = headers.get("authorization")
    if header is None:
        return headers.get("x-api-key")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


# Declared so OpenAPI documents the two ways to send a key (and clients and fuzzers see
# which routes need one); `auto_error=False`: the key ring makes the 401/403 decision.
_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="`Bearer KEY`")
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey")


def require(scope: Scope) -> Callable[..., Coroutine[Any, Any, str]]:
    """A FastAPI dependency that admits only keys with `scope`."""

    async def dependency(
        request: Request,
        _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
        _api_key: Annotated[str | None, Security(_API_KEY)],
    ) -> str:
        keys: KeyRing = request.app.state.services.keys
        return keys.check(bearer_or_api_key(request.headers), scope)

    return dependency
