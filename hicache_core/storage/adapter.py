"""Make every backend speak v1 to the controller.

* :class:`V0Adapter` turns v0 ``batch_get/batch_set`` of flat page tensors into v1 reads and writes on host pages,
  checking every page it receives (a wrong-sized or missing page is a miss, never copied in).
* :class:`NamespacedBackend` prefixes keys with the storage namespace for backends that do not apply it themselves
  (classes written for SGLang know nothing of our namespace; without it two configs would read each other's pages).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)


class _Delegate:
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


class NamespacedBackend(_Delegate):
    """Prefixes every key with the namespace tag before it reaches a namespace-unaware backend."""

    def __init__(self, inner: Any, namespace) -> None:
        super().__init__(inner)
        self.namespace = namespace

    def batch_exists(self, keys: list[str]) -> int:
        return self.inner.batch_exists(self.namespace.keys(keys))

    def batch_get_v1(self, keys, host_indices):
        return self.inner.batch_get_v1(self.namespace.keys(keys), host_indices)

    def batch_set_v1(self, keys, host_indices):
        return self.inner.batch_set_v1(self.namespace.keys(keys), host_indices)


def _as_bool_list(result: Any, n: int) -> list[bool]:
    if isinstance(result, (list, tuple)):
        out = [bool(r) for r in result]
        if len(out) != n:
            raise ValueError(f"backend returned {len(out)} results for {n} pages")
        return out
    return [bool(result)] * n


class V0Adapter(_Delegate):
    """v1 on top of v0: pages travel as flat tensors between the backend and the host pool."""

    def batch_exists(self, keys: list[str]) -> int:
        if hasattr(self.inner, "batch_exists"):
            return int(self.inner.batch_exists(keys))
        for i, k in enumerate(keys):
            if not self.inner.exists(k):
                return i
        return len(keys)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        pool = self.mem_pool_host
        ps = pool.page_size
        targets = [pool.dummy_flat_page() for _ in keys]
        if hasattr(self.inner, "batch_get"):
            values = self.inner.batch_get(keys, targets)
        else:
            values = [self.inner.get(k, t) for k, t in zip(keys, targets)]
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
        return ok

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        pool = self.mem_pool_host
        ps = pool.page_size
        values = [pool.get_flat_page(int(host_indices[i * ps])) for i in range(len(keys))]
        if hasattr(self.inner, "batch_set"):
            return _as_bool_list(self.inner.batch_set(keys, values), len(keys))
        return [bool(self.inner.set(k, v)) for k, v in zip(keys, values)]
