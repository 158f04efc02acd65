"""Tenants at the door: a request's ``cache_salt`` and ``extra_key`` name its tenant (its namespace seed, as the
cache's keys do), and no tenant may crowd out the others.

* ``--tenant-max-requests``: requests of one tenant in flight at once (``/generate``, ``/v1/*``); past it a 429.
* ``--tenant-max-restores``: restores (``POST /hicache/prefetch``) of one tenant running at once; past it a 429.
* ``--tenant-restore-ratio``: the share of the host tier one tenant's running restores may be bringing in.
* Retained prefixes per tenant are the cache's business (``--hicache-retention-tenant-ratio``): a hint past it is
  answered ``clipped`` or ``rejected`` in the request's ``meta_info``; the generation itself goes on.

A 429 says which limit, its flag and when to retry (``Retry-After``).
"""

from __future__ import annotations

import argparse
import threading
from collections import Counter
from typing import Any, Optional

from hicache_core.keys import namespace_seed
from hicache_core.parse import arg_float, arg_int
from hicache_core.serve.protocol import BadRequest

RETRY_AFTER_S = 1


class TooMany(BadRequest):
    """A tenant's limit is reached: 429, with a Retry-After."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 429)


def add_tenant_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--tenant-max-requests",
        type=arg_int(0, 1 << 20),
        default=0,
        metavar="N",
        help="requests of one tenant (cache_salt/extra_key) in flight at once; more get 429 (default 0: no limit)",
    )
    g.add_argument(
        "--tenant-max-restores",
        type=arg_int(0, 1 << 16),
        default=8,
        metavar="N",
        help="restores (POST /hicache/prefetch) of one tenant running at once; more get 429 (default %(default)s; "
        "0: no limit)",
    )
    g.add_argument(
        "--tenant-restore-ratio",
        type=arg_float(0),
        default=0.25,
        metavar="R",
        help="the share of the host tier one tenant's running restores may be bringing in; more get 429 "
        "(default %(default)s; 0: no limit)",
    )


def tenant(salt: Optional[str], extra_key: Optional[str]) -> Optional[str]:
    """The tenant a request's salt and extra key name: the namespace seed its pages are keyed under."""
    return namespace_seed(extra_key, salt)


class TenantLimits:
    """Requests in flight per tenant: taken by the handler (event loop), given back when the scheduler finishes the
    request (its thread)."""

    def __init__(self, args: Any) -> None:
        self.max_requests = int(getattr(args, "tenant_max_requests", 0) or 0)
        self.max_restores = int(getattr(args, "tenant_max_restores", 0) or 0)
        self.restore_ratio = float(getattr(args, "tenant_restore_ratio", 0.0) or 0.0)
        self._lock = threading.Lock()
        self.in_flight: Counter = Counter()

    def take(self, who: Optional[str], n: int = 1) -> None:
        with self._lock:
            if self.max_requests and self.in_flight[who] + n > self.max_requests:
                raise TooMany(
                    f"this tenant has {self.in_flight[who]} requests in flight and may have {self.max_requests} "
                    f"(--tenant-max-requests); retry when one finishes"
                )
            self.in_flight[who] += n

    def give_back(self, who: Optional[str]) -> None:
        with self._lock:
            self.in_flight[who] -= 1
            if self.in_flight[who] <= 0:
                del self.in_flight[who]

    def check_restore(self, running: list[Any], who: Optional[str], need_tokens: int, host_tokens: int) -> None:
        """Before a restore of ``need_tokens`` starts: refuse it (429) if this tenant's running restores are at
        either limit. ``running``: the cache's running restores (every tenant's)."""
        mine = [r for r in running if r.seed == who]
        if self.max_restores and len(mine) >= self.max_restores:
            raise TooMany(
                f"this tenant has {len(mine)} restores running and may have {self.max_restores} "
                "(--tenant-max-restores); retry when one ends"
            )
        if self.restore_ratio and host_tokens:
            cap = int(self.restore_ratio * host_tokens)
            taking = sum(max(0, len(r.tokens) - r.cached_tokens) for r in mine)
            if mine and taking + need_tokens > cap:
                raise TooMany(
                    f"this tenant's running restores bring in {taking} tokens and this one {need_tokens}; one "
                    f"tenant may bring in {cap} ({self.restore_ratio:g} of the host tier, --tenant-restore-ratio); "
                    "retry when one ends"
                )
