"""Make every backend speak v1 to the controller.

* :class:`V0Adapter` turns v0 ``batch_get/batch_set`` of flat page tensors into v1 reads and writes on host pages,
  checking every page it receives (a wrong-sized or missing page is a miss, never copied in).
* :class:`NamespacedBackend` prefixes keys with the storage namespace for backends that do not apply it themselves
  (classes written for SGLang know nothing of our namespace; without it two configs would read each other's pages).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Optional

import attrs
import torch

from hicache_core.storage.base import ExtraInfo, call_with_extra

logger = logging.getLogger(__name__)


class Delegate:
    """Forwards housekeeping calls to the wrapped backend."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def register_mem_pool_host(self, mem_pool_host) -> None:
        self.mem_pool_host = mem_pool_host
        self.inner.register_mem_pool_host(mem_pool_host)

    def clear(self) -> None:
        if hasattr(self.inner, "clear"):
            self.inner.clear()

    def get_stats(self) -> Optional[dict]:
        return self.inner.get_stats() if hasattr(self.inner, "get_stats") else None

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class NamespacedBackend(Delegate):
    """Prefixes every key with the namespace tag before it reaches a namespace-unaware backend (v1 and v0 alike)."""

    def __init__(self, inner: Any, namespace) -> None:
        super().__init__(inner)
        self.namespace = namespace

    def get(self, key: str, target_location=None):
        return self.inner.get(self.namespace.key(key), target_location)

    def set(self, key: str, value) -> Any:
        return self.inner.set(self.namespace.key(key), value)

    def exists(self, key: str) -> bool:
        return self.inner.exists(self.namespace.key(key))

    def batch_get(self, keys: list[str], target_locations=None) -> list:
        return self.inner.batch_get(self.namespace.keys(keys), target_locations)

    def batch_set(self, keys: list[str], values) -> Any:
        return self.inner.batch_set(self.namespace.keys(keys), values)

    def _extra(self, extra: Optional[ExtraInfo]) -> Optional[ExtraInfo]:
        if extra is None or not extra.prefix_keys:
            return extra
        return attrs.evolve(extra, prefix_keys=self.namespace.keys(extra.prefix_keys))

    def batch_exists(self, keys: list[str], extra_info: Optional[ExtraInfo] = None) -> int:
        return call_with_extra(self.inner.batch_exists, self.namespace.keys(keys), extra=self._extra(extra_info))

    def batch_get_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None):
        return call_with_extra(
            self.inner.batch_get_v1, self.namespace.keys(keys), host_indices, extra=self._extra(extra_info)
        )

    def batch_set_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None):
        return call_with_extra(
            self.inner.batch_set_v1, self.namespace.keys(keys), host_indices, extra=self._extra(extra_info)
        )

    def batch_set_blobs(self, keys: list[str], blobs: list, extra_info: Optional[ExtraInfo] = None) -> list[bool]:
        return call_with_extra(
            self.inner.batch_set_blobs, self.namespace.keys(keys), blobs, extra=self._extra(extra_info)
        )

    def batch_get_blobs(self, keys: list[str], max_bytes: int, extra_info: Optional[ExtraInfo] = None) -> list:
        return call_with_extra(
            self.inner.batch_get_blobs, self.namespace.keys(keys), max_bytes, extra=self._extra(extra_info)
        )


def _as_bool_list(result: Any, n: int) -> list[bool]:
    if isinstance(result, (list, tuple)):
        out = [bool(r) for r in result]
        if len(out) != n:
            raise ValueError(f"backend returned {len(out)} results for {n} pages")
        return out
    return [bool(result)] * n


def _takes_target(method: Any) -> bool:
    """Whether ``get`` accepts a target buffer after the key (the seed's minimal ``get(key)`` does not)."""
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class V0Adapter(Delegate):
    """v1 on top of v0: pages travel as flat tensors between the backend and the host pool.

    The seed's minimal backend -- ``get(key)``, ``set(key, value)``, ``exists(key)`` and nothing else -- is enough:
    the batch methods derive from the single ones, and ``register_mem_pool_host`` is optional."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self._get_with_target = _takes_target(inner.get)
        self._counts = dict.fromkeys(("get_pages", "get_misses", "set_pages", "set_failed"), 0)

    def get_stats(self) -> Optional[dict]:
        """The class's own stats, or -- for a class that keeps none -- what the adapter counted."""
        own = self.inner.get_stats() if callable(getattr(self.inner, "get_stats", None)) else None
        return own if own is not None else dict(self._counts)

    def register_mem_pool_host(self, mem_pool_host) -> None:
        self.mem_pool_host = mem_pool_host
        if callable(getattr(self.inner, "register_mem_pool_host", None)):
            self.inner.register_mem_pool_host(mem_pool_host)

    # --- v0, each batch method derived from the single one when the class has none ---------------------------
    def get(self, key: str, target_location: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        return self.inner.get(key, target_location) if self._get_with_target else self.inner.get(key)

    def batch_get(self, keys: list[str], target_locations: Optional[list] = None) -> list:
        if hasattr(self.inner, "batch_get"):
            return self.inner.batch_get(keys, target_locations)
        targets = target_locations or [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, targets)]

    def batch_set(self, keys: list[str], values: list[torch.Tensor]) -> Any:
        if hasattr(self.inner, "batch_set"):
            return self.inner.batch_set(keys, values)
        return [bool(self.inner.set(k, v)) for k, v in zip(keys, values)]

    def batch_exists(self, keys: list[str], extra_info: Optional[ExtraInfo] = None) -> int:
        if hasattr(self.inner, "batch_exists"):
            return int(call_with_extra(self.inner.batch_exists, keys, extra=extra_info))
        for i, k in enumerate(keys):
            if not self.inner.exists(k):
                return i
        return len(keys)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        pool = self.mem_pool_host
        ps = pool.page_size
        values = self.batch_get(keys, [pool.dummy_flat_page() for _ in keys])
        if not isinstance(values, (list, tuple)):
            values = [None] * len(keys)  # SGLang's contract allows an int here: no usable pages
        ok = []
        want = pool.page_bytes
        for i, value in enumerate(values[: len(keys)]):
            good = isinstance(value, torch.Tensor) and value.numel() * value.element_size() == want
            if good:
                data = value.reshape(-1)
                if data.dtype != pool.dtype:
                    data = data.contiguous().view(torch.uint8).view(pool.dtype)
                pool.set_flat_page(int(host_indices[i * ps]), data.cpu())
            elif value is not None:
                logger.warning("backend returned a malformed page for %s (%r): treated as a miss", keys[i], type(value))
            ok.append(good)
        ok += [False] * (len(keys) - len(ok))
        self._counts["get_pages"] += sum(ok)
        self._counts["get_misses"] += len(ok) - sum(ok)
        return ok

    # --- blobs (the L3 codec's values) as v0 tensors: a class's own blob methods when it has them ---------------
    def batch_set_blobs(self, keys: list[str], blobs: list) -> list[bool]:
        if hasattr(self.inner, "batch_set_blobs"):
            return self.inner.batch_set_blobs(keys, blobs)
        values = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        return _as_bool_list(self.batch_set(keys, values), len(keys))

    def batch_get_blobs(self, keys: list[str], max_bytes: int) -> list:
        if hasattr(self.inner, "batch_get_blobs"):
            return self.inner.batch_get_blobs(keys, max_bytes)
        out: list = []
        for key in keys:
            value = self.inner.get(key)
            ok = isinstance(value, torch.Tensor) and value.numel() * value.element_size() <= max_bytes
            out.append(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if ok else None)
        return out

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        pool = self.mem_pool_host
        ps = pool.page_size
        values = [pool.get_flat_page(int(host_indices[i * ps])) for i in range(len(keys))]
        ok = _as_bool_list(self.batch_set(keys, values), len(keys))
        self._counts["set_pages"] += sum(ok)
        self._counts["set_failed"] += len(ok) - sum(ok)
        return ok


def as_v1(raw: Any, *, interface_v1: bool, namespace) -> Any:
    """What the controller talks to for a constructed backend: v0 classes behind :class:`V0Adapter`, classes that
    do not apply the namespace themselves behind :class:`NamespacedBackend`."""
    inner = raw if interface_v1 else V0Adapter(raw)
    return inner if getattr(raw, "applies_namespace", False) else NamespacedBackend(inner, namespace)


class ReadOnlyRank(Delegate):
    """MLA under tensor parallelism: the latent KV is the same on every rank and ranks share its pages, so rank 0
    writes them and every other rank only reads (storage receives each page once; SGLang's rule)."""

    def batch_exists(self, keys: list[str], extra_info: Optional[ExtraInfo] = None) -> int:
        return call_with_extra(self.inner.batch_exists, keys, extra=extra_info)

    def batch_get_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None):
        return call_with_extra(self.inner.batch_get_v1, keys, host_indices, extra=extra_info)

    def batch_set_v1(self, keys, host_indices, extra_info: Optional[ExtraInfo] = None) -> list[bool]:
        return [True] * len(keys)  # rank 0 writes these pages
