"""pluggy hook specifications: the control plane of hicache plugins (registration and lifecycle only).

Per-page I/O never goes through hooks: a plugin names backend classes here, and the core calls those classes
directly. A plugin module implements any of these with ``@hookimpl`` and declares itself with an entry point in
group ``hicache``, for example ``file = "hicache_plugin_file.plugin"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional

import attrs
import pluggy

PROJECT = "hicache"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@attrs.frozen(kw_only=True)
class BackendRecord:
    """One storage backend a plugin offers, loaded lazily from ``target`` ("module:Class") when selected."""

    name: str
    target: str
    interface_v1: bool = True
    description: str = ""
    page_first_only: bool = False  # serves only page_first / page_first_direct host layouts (zero copy)
    install_hint: Optional[str] = None  # what to pip install when the target does not import
    requires: tuple[str, ...] = attrs.field(default=(), converter=tuple)  # modules the target needs at run time


if TYPE_CHECKING:
    from hicache_core.storage.base import StorageConfig


@hookspec
def hicache_storage_backends() -> Iterable[BackendRecord]:  # type: ignore[empty-body]
    """Yield (or return a list of) the storage backends this plugin provides."""


@hookspec
def hicache_backend_created(name: str, backend: Any, storage_config: StorageConfig) -> None:
    """Observe a storage backend that was just constructed and registered with the host pool (``backend`` is the
    plugin's own object, before any adapter)."""


@hookspec
def hicache_backend_closed(name: str, backend: Any) -> None:
    """Observe a storage backend that was just closed."""


HOOK_NAMES = ("hicache_storage_backends", "hicache_backend_created", "hicache_backend_closed")
