"""Fault injection through the real controller: what ``hicache certify`` and the soak run drive.

Requests go through the front door of a real cache (tiny device and host pools, the backend under test as L3).
Each token's KV is a checksum of the whole prefix up to it (:func:`prefix_codes`), so the KV a request is served
must equal what computing it would give -- a no-cache run -- byte for byte, whatever tier it came from; one wrong
byte is a *wrong KV*. Between the controller's guard and the backend sits :class:`FaultyBackend`, which makes
a share of calls raise, hang past the deadline, return the wrong shapes, or damages stored pages, as a real broken
backend would. At the end every page must be free again (*leaked* otherwise).
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, Optional

import attrs
import torch

from hicache_core.cache import HiRadixCache, build_cache
from hicache_core.config import HiCacheConfig
from hicache_core.memory import DevicePool, KVSpec

SENTINEL = 7  # one token past a prompt's pages: always computed, so whole pages are servable


# --- KV that encodes its prefix --------------------------------------------------------------------------------------
def prefix_codes(tokens) -> torch.Tensor:
    """One int32 per position: a checksum of the whole prefix up to and including that token."""
    out, crc = [], 0
    for t in tokens:
        crc = zlib.crc32(int(t).to_bytes(4, "little", signed=True), crc)
        out.append(crc & 0x7FFFFFFF)
    return torch.tensor(out, dtype=torch.int32)


def _fill(pool: DevicePool, idx: torch.Tensor, codes: torch.Tensor) -> None:
    """Every 4-byte word of a slot's K (and V) in every layer gets its code (the spec's dtype must be 4 bytes wide
    or its slot a multiple of 4 bytes)."""
    for layer in range(pool.layer_num):
        bufs = [pool.k_buffer(layer)] + ([] if pool.is_mla else [pool.v_buffer(layer)])
        for kv, buf in enumerate(bufs):
            flat = buf.view(buf.shape[0], -1).view(torch.int32)
            flat[idx] = (codes + layer * 7 + kv * 3)[:, None].expand(-1, flat.shape[1])


def _codes(tokens, salt: Optional[str]) -> torch.Tensor:
    """The prefix codes of ``tokens``; under a salt, chained on a code of the salt (a salt's KV differs)."""
    if salt is None:
        return prefix_codes(tokens)
    return prefix_codes([zlib.crc32(salt.encode()) & 0x7FFFFFFF, *tokens])[1:]


def write_kv(pool: DevicePool, idx: torch.Tensor, tokens, salt: Optional[str] = None) -> None:
    """The KV of the first ``len(idx)`` tokens of ``tokens`` (under ``salt``) into device slots ``idx``."""
    _fill(pool, idx, _codes(tokens, salt)[: len(idx)])


def kv_matches(pool: DevicePool, idx: torch.Tensor, tokens, salt: Optional[str] = None) -> bool:
    """Whether slots ``idx`` hold exactly the KV of the first ``len(idx)`` tokens (written under ``salt``)."""
    if len(idx) == 0:
        return True
    codes = _codes(tokens, salt)[: len(idx)]
    for layer in range(pool.layer_num):
        pool.wait_layer(layer)
        bufs = [pool.k_buffer(layer)] + ([] if pool.is_mla else [pool.v_buffer(layer)])
        for kv, buf in enumerate(bufs):
            flat = buf.view(buf.shape[0], -1).view(torch.int32)[idx]
            if not torch.equal(flat, (codes + layer * 7 + kv * 3)[:, None].expand(-1, flat.shape[1])):
                return False
    return True


# --- a backend that misbehaves ----------------------------------------------------------------------------------------
FAULTS = ("raise", "hang", "bool_result", "short_result", "long_result", "bad_exists", "corrupt", "restart")


class FaultyBackend:
    """Wraps a backend handle; ``mode`` picks the fault, ``rate`` the share of calls it hits."""

    def __init__(self, inner: Any, mode: str, rate: float, rng: random.Random, hang_s: float = 1.0) -> None:
        self.inner, self.mode, self.rate, self.rng, self.hang_s = inner, mode, rate, rng, hang_s
        self.injected = 0
        self._lock = threading.Lock()

    def _hit(self) -> bool:
        with self._lock:
            if self.rng.random() < self.rate:
                self.injected += 1
                return True
            return False

    def batch_exists(self, keys):
        if self.mode == "raise" and self._hit():
            raise ConnectionResetError("injected: connection reset by peer")
        if self.mode == "bad_exists" and self._hit():
            return self.rng.choice([True, "3", -1, len(keys) + 5, None, 2.5])
        return self.inner.batch_exists(keys)

    def batch_get_v1(self, keys, host_indices):
        if self.mode == "raise" and self._hit():
            raise OSError("injected: I/O error")
        if self.mode == "hang" and self._hit():
            time.sleep(self.hang_s)  # past the deadline; then the real read lands in quarantined pages
        res = self.inner.batch_get_v1(keys, host_indices)
        if self.mode in ("bool_result", "short_result", "long_result") and self._hit():
            return {"bool_result": True, "short_result": list(res)[:-1] or None, "long_result": list(res) + [True] * 3}[
                self.mode
            ]
        return res

    def batch_set_v1(self, keys, host_indices):
        if self.mode == "raise" and self._hit():
            raise TimeoutError("injected: write timed out")
        if self.mode == "hang" and self._hit():
            time.sleep(self.hang_s)
        res = self.inner.batch_set_v1(keys, host_indices)
        if self.mode == "corrupt" and self._hit():
            for k in keys:
                self.inner_raw().corrupt_stored_page(k)
        if self.mode in ("bool_result", "short_result", "long_result") and self._hit():
            return {"bool_result": True, "short_result": list(res)[:-1] or None, "long_result": list(res) + [True] * 3}[
                self.mode
            ]
        return res

    def inner_raw(self) -> Any:
        return getattr(self.inner, "raw", self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --- the workload -----------------------------------------------------------------------------------------------------
@attrs.define
class RunResult:
    requests: int = 0
    wrong_kv: int = 0
    storage_tokens: int = 0
    faults: int = 0
    leaked_pages: int = 0
    longest_wait_s: float = 0.0
    storage_errors: dict = attrs.field(factory=dict)


def make_prompts(rng: random.Random, families: int, pages: int, page_size: int) -> list[list[int]]:
    """Prompts in families sharing long prefixes, each one page longer than its family's last."""
    out = []
    for _ in range(families):
        base = [rng.randrange(1, 1 << 30) for _ in range(pages * page_size)]
        out.append(base)
        out.append(base + [rng.randrange(1, 1 << 30) for _ in range(page_size)])
    return out


def run_requests(
    cache: HiRadixCache,
    prompts: list[list[int]],
    n: int,
    rng: random.Random,
    result: RunResult,
    between: Optional[Callable[[int], None]] = None,
    wait_limit_s: float = 60.0,
) -> None:
    """``n`` requests drawn from ``prompts`` through the front door; every served byte checked."""
    for i in range(n):
        if between is not None:
            between(i)
        prompt = rng.choice(prompts) + [SENTINEL]
        rid = f"req-{result.requests}"
        t0 = time.monotonic()
        while (adm := cache.admit(rid, prompt)).status == "wait":
            if time.monotonic() - t0 > wait_limit_s:
                cache.abort(rid)
                raise TimeoutError(f"a request waited more than {wait_limit_s} s for its prefetch")
            time.sleep(0.001)
            cache.poll()
        result.longest_wait_s = max(result.longest_wait_s, time.monotonic() - t0)
        if not adm.ready:  # the device pool is full of pinned pages: nothing to check, try later
            cache.poll()
            continue
        cache.ready_to_load_host_cache()
        if not kv_matches(cache.device_pool, adm.prefix, prompt):
            result.wrong_kv += 1
        computed = len(prompt) - len(adm.prefix)
        write_kv(cache.device_pool, adm.slots(computed), prompt)
        cache.release(adm, prompt, computed)
        cache.poll()
        result.requests += 1
        result.storage_tokens += adm.cached["storage"]


def drain(cache: HiRadixCache, result: RunResult, timeout: float = 30.0) -> None:
    """Close with a drain (every copy, backup and late call back, every unpinned page freed); count pages that did
    not come back."""
    dev_total, host_total = cache.device_pool.size, cache.host_pool.size if cache.host_pool is not None else 0
    cache.close(drain_timeout=timeout)
    ps = cache.page_size
    result.leaked_pages = (dev_total - cache.device_pool.available_size()) // ps
    if cache.host_pool is not None:
        result.leaked_pages += (host_total - cache.host_pool.available_size()) // ps
    result.storage_errors = dict(cache.metrics.stats()["storage_errors"])


def small_cache(config: HiCacheConfig, spec: KVSpec, *, device_pages: int = 12, host_pages: int = 24) -> HiRadixCache:
    """A cache with tiny pools over the configured backend, so storage is read and written all the time."""
    ps = config.page_size
    return build_cache(
        config,
        spec,
        device_pages * ps,
        tiers="hicache+storage",
        device="cpu",
        host_tokens=host_pages * ps,
        pin_memory=False,
    )
