"""Keys at the door (serve/auth.py), without a server: who each key lets through on which kind of route, keys
checked at start, the bearer header parsed as clients send it. tests_serve/test_auth.py drives a real server."""

from __future__ import annotations

import argparse
import time

import pytest

from hicache_core.cache.restore import Restore
from hicache_core.errors import ConfigError
from hicache_core.serve.auth import Keys, bearer
from hicache_core.serve.tenants import TenantLimits, TooMany


def keys(api=None, admin=None, metrics=False, env=None) -> Keys:
    return Keys.from_args(argparse.Namespace(api_key=api, admin_api_key=admin, admin_metrics=metrics), env or {})


@pytest.mark.parametrize(
    "api, admin, token, role",
    [
        (None, None, None, "admin"),  # no keys: open, as before
        (None, None, "anything", "admin"),
        ("k", None, None, "none"),
        ("k", None, "k", "admin"),  # with --api-key alone, it opens the operator routes too
        ("k", None, "x", "none"),
        ("k", "A", "k", "user"),
        ("k", "A", "A", "admin"),
        ("k", "A", "x", "none"),
        (None, "A", None, "user"),  # only the operator routes are guarded
        (None, "A", "A", "admin"),
        ("k", "A", "k ", "none"),
        ("k", "A", "", "none"),
    ],
)
def test_roles(api, admin, token, role):
    assert keys(api, admin).role(token) == role


def test_route_kinds():
    k = keys("k", "A", metrics=True)
    assert k.route_kind("GET", "/health") == "open"
    assert k.route_kind("POST", "/generate") == "user"
    assert k.route_kind("GET", "/hicache/sessions") == "user"
    for method, path in [("PUT", "/hicache/storage-backend"), ("DELETE", "/hicache/storage-backend")]:
        assert k.route_kind(method, path) == "operator"
    assert k.route_kind("GET", "/hicache/storage-backend") == "operator"
    assert k.route_kind("POST", "/flush_cache") == "operator"
    assert k.route_kind("GET", "/metrics") == "operator"
    assert keys("k").route_kind("GET", "/metrics") == "user"


def test_keys_come_from_the_environment_and_bad_ones_fail_at_start():
    assert keys(env={"HICACHE_API_KEY": "e"}).role("e") == "admin"
    assert keys("flag", env={"HICACHE_API_KEY": "e"}).role("flag") == "admin"  # the flag wins
    for bad in ("", " k", "k\n"):
        with pytest.raises(ConfigError, match="must be a non-empty printable string"):
            keys(bad)
    with pytest.raises(ConfigError, match=r"\$HICACHE_ADMIN_API_KEY"):
        keys(env={"HICACHE_ADMIN_API_KEY": ""})  # set but empty: never read as "no key"
    with pytest.raises(ConfigError, match="the same key"):
        keys("same", "same")
    with pytest.raises(ConfigError, match="--admin-metrics guards /metrics"):
        keys(metrics=True)


def test_the_keys_themselves_are_not_kept():
    k = keys("secret-api", "secret-admin")
    assert "secret" not in repr(k)


@pytest.mark.parametrize(
    "headers, token",
    [
        ([(b"authorization", b"Bearer abc")], "abc"),
        ([(b"Authorization", b"bearer  abc ")], "abc"),
        ([(b"authorization", b"Basic abc")], None),
        ([(b"authorization", b"Bearer")], None),
        ([], None),
    ],
)
def test_bearer(headers, token):
    assert bearer(headers) == token


def test_tenant_limits_requests_in_flight():
    lim = TenantLimits(argparse.Namespace(tenant_max_requests=2))
    lim.take("a", 2)
    with pytest.raises(TooMany, match=r"2 requests in flight and may have 2 \(--tenant-max-requests\)") as e:
        lim.take("a")
    assert e.value.status == 429
    lim.take("b")  # another tenant is not held back by a
    lim.give_back("a")
    lim.take("a")
    with pytest.raises(TooMany):
        lim.take(None, 3)  # a batch is taken whole or not at all
    assert lim.in_flight == {"a": 2, "b": 1}


def test_tenant_limits_restores():
    lim = TenantLimits(argparse.Namespace(tenant_max_restores=2, tenant_restore_ratio=0.25))
    now = time.monotonic()
    one = Restore("x", list(range(64)), "a", 60.0, now + 60)
    lim.check_restore([], "a", 10_000, 1000)  # a tenant's first restore always goes: the prefetcher bounds it
    with pytest.raises(TooMany, match=r"bring in 64 tokens and this one 200; one tenant may bring in 250"):
        lim.check_restore([one], "a", 200, 1000)
    lim.check_restore([one], "b", 200, 1000)
    with pytest.raises(TooMany, match=r"2 restores running and may have 2 \(--tenant-max-restores\)"):
        lim.check_restore([one, one], "a", 1, 10**6)
