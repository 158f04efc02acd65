"""The storage backend contract: what an L3 backend implements.

A backend is built as ``Backend(storage_config, extra_config)`` -- the shape SGLang's ``dynamic`` loader uses --
then :meth:`HiCacheStorage.register_mem_pool_host` is called before any I/O.

* v0: flat page tensors (``get/set/exists/batch_get/batch_set/batch_exists``).
* v1 (zero copy): ``batch_get_v1/batch_set_v1`` read and write host-pool pages in place by host indices.

The controller speaks v1 only; a v0-only backend is wrapped by :class:`~hicache_core.storage.adapter.V0Adapter`.
Rules every backend keeps: a failed write never becomes visible; a read that cannot prove its bytes is a miss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional, Protocol, runtime_checkable

import attrs
import torch

from hicache_core.keys import StorageNamespace


@attrs.frozen
class ExtraInfo:
    """What a v1 call may carry besides its keys, as SGLang's ``HiCacheStorageExtraInfo``: with
    ``hicache_storage_pass_prefix_keys`` on, ``prefix_keys`` are the storage keys of every page before the batch's
    first (its prefix in the tree), in order. Passed as a third argument only to methods that take one."""

    prefix_keys: Optional[list[str]] = None
    extra_info: Optional[dict] = None

    @classmethod
    def of(cls, other: Any) -> Optional[ExtraInfo]:
        """Ours from SGLang's (or anything with those fields); None when it carries nothing."""
        if other is None or isinstance(other, ExtraInfo):
            return other
        keys = getattr(other, "prefix_keys", None)
        keys = [k for k in keys if isinstance(k, str)] if isinstance(keys, (list, tuple)) else None
        extra = getattr(other, "extra_info", None)
        if not keys and not extra:
            return None
        return cls(keys or None, extra if isinstance(extra, dict) else None)


_TAKES_EXTRA: dict[Any, bool] = {}


def takes_extra_info(fn: Callable, nargs: int) -> bool:
    """Does ``fn`` (called with ``nargs`` positional arguments) accept one more, ``extra_info``?"""
    key = (getattr(fn, "__func__", fn), nargs)
    found = _TAKES_EXTRA.get(key)
    if found is None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        found = any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) > nargs
        _TAKES_EXTRA[key] = found
    return found


def call_with_extra(fn: Callable, *args: Any, extra: Optional[ExtraInfo] = None) -> Any:
    """``fn(*args, extra)`` when there is extra info and ``fn`` takes it, else ``fn(*args)``."""
    if extra is not None and takes_extra_info(fn, len(args)):
        return fn(*args, extra)
    return fn(*args)


@attrs.frozen(kw_only=True)
class StorageConfig:
    """What a backend learns about the deployment. The first six fields carry SGLang's
    ``HiCacheStorageConfig`` names, so classes written for SGLang read them unchanged."""

    tp_rank: int = 0
    tp_size: int = 1
    is_mla_model: bool = False
    is_page_first_layout: bool = False
    model_name: Optional[str] = None
    extra_config: dict = attrs.field(factory=dict)
    namespace: StorageNamespace = attrs.field(factory=StorageNamespace)
    page_size: int = 64
    layout: str = "layer_first"
    # the L3 page codec (storage/codec.py): name (none, zstd, fp8), when (pays, always), zstd level; the core wraps
    # the backend's blob methods with it, so a backend never sees it
    codec: tuple[str, str, int] = ("none", "pays", 1)
    # KV heads per stored object (storage/head_split.py; 0: each rank's whole shard of a page is one object)
    head_group: int = 0


@runtime_checkable
class StorageV1(Protocol):
    """What the controller calls: every backend speaks this once built (v0 classes through the core's adapter)."""

    def batch_exists(self, keys: list[str]) -> int: ...

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]: ...

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]: ...

    def clear(self) -> None: ...

    def get_stats(self) -> Optional[dict[str, Any]]: ...

    def close(self) -> None: ...


class HiCacheStorage:
    """Base class for storage backends: implement v0 (``get/set/exists``), v1 (``batch_get_v1/batch_set_v1``) or
    both; whatever is not implemented raises a clear error if called. Subclasses apply ``self.namespace`` to every
    key they store (``applies_namespace = True``); the core prefixes keys itself for classes that do not say so."""

    applies_namespace: bool = True

    def __init__(self, storage_config: StorageConfig, extra_config: Optional[dict[str, Any]] = None) -> None:
        self.storage_config = storage_config
        self.extra_config = dict(extra_config or {})
        self.namespace = storage_config.namespace
        self.mem_pool_host: Any = None  # the host pool (a HostPool, or an SGLang-shaped one), once registered

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Called once, before any I/O, with the :class:`~hicache_core.memory.HostPool` pages move through."""
        self.mem_pool_host = mem_pool_host

    def _not_implemented(self, method: str, kind: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__} does not implement {method} ({kind}); the core calls "
            f"it only when the backend is registered as {kind}"
        )

    # --- v0: flat pages ----------------------------------------------------------------------------------------
    def get(self, key: str, target_location: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The page stored under ``key`` (written into ``target_location`` when given), or None."""
        raise self._not_implemented("get", "v0")

    def set(self, key: str, value: torch.Tensor) -> bool:
        """Store one flat page; True once it is durably visible. A failed set leaves nothing visible."""
        raise self._not_implemented("set", "v0")

    def exists(self, key: str) -> bool:
        raise self._not_implemented("exists", "v0")

    def batch_get(self, keys: list[str], target_locations: Optional[list[torch.Tensor]] = None) -> list:
        targets: list[Optional[torch.Tensor]] = [None] * len(keys)
        if target_locations is not None:
            targets = list(target_locations)
        return [self.get(k, t) for k, t in zip(keys, targets)]

    def batch_set(self, keys: list[str], values: list[torch.Tensor]) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values))

    def batch_exists(self, keys: list[str]) -> int:
        """How many keys exist consecutively from the start."""
        for i, k in enumerate(keys):
            if not self.exists(k):
                return i
        return len(keys)

    # --- v1: zero copy on host pages -------------------------------------------------------------------------
    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        """Read ``len(keys)`` pages straight into the host pool at ``host_indices`` (page_size slots each)."""
        raise self._not_implemented("batch_get_v1", "v1")

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor) -> list[bool]:
        raise self._not_implemented("batch_set_v1", "v1")

    # --- blobs (optional): what the L3 codec stores, values of any length up to a page and a header ------------
    # A backend that has both takes ``"codec"`` in the extra config (storage/codec_storage.py); one that has not
    # refuses it at start. ``batch_set_blobs(keys, blobs) -> list[bool]`` stores each blob under its page key (the
    # same atomicity as batch_set_v1); ``batch_get_blobs(keys, max_bytes) -> list`` gives each key's blob (bytes or
    # a buffer, at most ``max_bytes``) or None.

    # --- housekeeping ------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Remove every page this backend stores."""

    def get_stats(self) -> Optional[dict[str, Any]]:
        return None

    def describe(self) -> str:
        """Where this backend keeps its pages, for humans (``hicache check`` prints it)."""
        return type(self).__name__

    def close(self) -> None:
        """Release connections, files and threads."""
