"""The registry: backend names -> classes (``names``: entry points, built-ins, ``dynamic`` module_path/class_name,
the rules a backend brings) and opening one for a host pool (``opening``: namespace, construction, the v1 face,
quota and MLA writer checks, lifecycle hooks)."""

from hicache_core.registry.names import (
    KNOWN_PLUGINS,
    ResolvedBackend,
    check_layout,
    construct,
    load_class,
    resolve,
    resolve_config,
)
from hicache_core.registry.opening import (
    StorageBackendHandle,
    create_backend,
    make_storage_config,
    open_backend,
    open_storage,
    quota_checked,
)

__all__ = [
    "KNOWN_PLUGINS",
    "ResolvedBackend",
    "StorageBackendHandle",
    "check_layout",
    "construct",
    "create_backend",
    "load_class",
    "make_storage_config",
    "open_backend",
    "open_storage",
    "quota_checked",
    "resolve",
    "resolve_config",
]
