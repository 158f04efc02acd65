"""Who may call what: ``--api-key`` for every route, ``--admin-api-key`` for the operator routes.

A client sends ``Authorization: Bearer <key>`` (what OpenAI's client and SGLang's ``bench_serving`` send). Routes
come in three kinds (:func:`route_kind`):

* open: ``GET /health`` (load balancers probe it without a key);
* operator: what changes or reveals the cache for everyone -- attach, detach and read the storage backend,
  ``/flush_cache``, ``/metrics`` with ``--admin-metrics``; handlers also ask :func:`is_admin` before they act for
  another tenant (``GET /hicache/sessions?all_tenants=true``, ``DELETE /hicache/sessions/{id}?tenant=...``);
* the rest: serving and the caller's own tenant's fleet routes.

With neither key set every route is open, as before. With ``--api-key`` alone, that key opens every route. With
``--admin-api-key``, only it opens the operator routes (and it opens the others too). A missing or wrong key is a
401 in the server's usual error body; keys are compared by their SHA-256 digests in constant time, so neither
their bytes nor their length leak through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

import attrs

from hicache_core.errors import ConfigError

API_KEY_ENV = "HICACHE_API_KEY"
ADMIN_KEY_ENV = "HICACHE_ADMIN_API_KEY"

OPEN = frozenset({("GET", "/health"), ("HEAD", "/health")})
OPERATOR = frozenset(
    {
        ("GET", "/hicache/storage-backend"),
        ("PUT", "/hicache/storage-backend"),
        ("DELETE", "/hicache/storage-backend"),
        ("POST", "/flush_cache"),
    }
)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _check_key(key: Optional[str], flag: str, env: str) -> Optional[str]:
    if key is None:
        return None
    if not key or key != key.strip() or any(not c.isprintable() for c in key):
        raise ConfigError(
            f"{flag} (or ${env}) must be a non-empty printable string without surrounding spaces; "
            "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return key


@attrs.frozen
class Keys:
    """The server's keys (their digests: the keys themselves are not kept)."""

    api: Optional[bytes] = None
    admin: Optional[bytes] = None
    admin_metrics: bool = False

    @classmethod
    def from_args(cls, args: Any, environ: Optional[dict] = None) -> Keys:
        env = os.environ if environ is None else environ

        def given(attr: str, name: str) -> Optional[str]:  # an empty key is an error, never "no key"
            flag = getattr(args, attr, None)
            return flag if flag is not None else env.get(name)

        api = _check_key(given("api_key", API_KEY_ENV), "--api-key", API_KEY_ENV)
        admin = _check_key(given("admin_api_key", ADMIN_KEY_ENV), "--admin-api-key", ADMIN_KEY_ENV)
        if api is not None and api == admin:
            raise ConfigError("--api-key and --admin-api-key are the same key: give operators a key of their own")
        metrics = bool(getattr(args, "admin_metrics", False))
        if metrics and api is None and admin is None:
            raise ConfigError("--admin-metrics guards /metrics with a key: give --admin-api-key (or --api-key)")
        return cls(_digest(api) if api is not None else None, _digest(admin) if admin is not None else None, metrics)

    @property
    def enabled(self) -> bool:
        return self.api is not None or self.admin is not None

    def role(self, token: Optional[str]) -> str:
        """``admin``, ``user`` or ``none``: what ``token`` (the bearer key, or None) may do here."""
        given = _digest(token) if token is not None else b""

        def same(want: Optional[bytes]) -> bool:
            return want is not None and token is not None and hmac.compare_digest(given, want)

        is_admin = same(self.admin) if self.admin is not None else (same(self.api) if self.api is not None else True)
        if is_admin:
            return "admin"
        if self.api is None or same(self.api):
            return "user"
        return "none"

    def route_kind(self, method: str, path: str) -> str:
        """``open``, ``operator`` or ``user``."""
        if (method, path) in OPEN:
            return "open"
        if (method, path) in OPERATOR or (self.admin_metrics and path == "/metrics"):
            return "operator"
        return "user"


def bearer(headers: list[tuple[bytes, bytes]]) -> Optional[str]:
    """The key of an ``Authorization: Bearer <key>`` header (the scheme in any case), or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


BEARER_CHALLENGE = 'Bearer realm="hicache"'
ROLE = "hicache_role"  # where the middleware leaves the caller's role, in the request's scope


def is_admin(scope: Mapping[str, Any]) -> bool:
    return scope.get(ROLE) == "admin"


class KeyMiddleware:
    """ASGI middleware: refuse a request whose key does not open its route (401), before any handler runs; leave
    the caller's role in ``scope[ROLE]`` for the handlers that act for other tenants."""

    def __init__(self, app: Any, keys: Keys, error: Callable[[int, str], Any]) -> None:
        self.app, self.keys, self.error = app, keys, error

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = bearer(scope.get("headers", []))
        role = self.keys.role(token)
        scope[ROLE] = role
        kind = self.keys.route_kind(scope["method"], scope["path"])
        refusal = None
        if kind == "operator" and role != "admin":
            which = "--admin-api-key" if self.keys.admin is not None else "--api-key"
            refusal = f"{scope['method']} {scope['path']} is an operator route: send Authorization: Bearer <{which}>"
        elif kind == "user" and role == "none":
            refusal = (
                "a valid API key is required: send Authorization: Bearer <the server's --api-key>"
                if token is None
                else "the API key is wrong: send Authorization: Bearer <the server's --api-key>"
            )
        if refusal is None:
            await self.app(scope, receive, send)
            return
        response = self.error(401, refusal)
        response.headers["WWW-Authenticate"] = BEARER_CHALLENGE
        await response(scope, receive, send)
