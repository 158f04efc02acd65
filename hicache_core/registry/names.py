"""Backend names -> classes, loaded lazily; ``dynamic`` loading from ``module_path``/``class_name``; the rules a
resolved backend brings (its page-first-only layout rule, the layout adjustments it implies); construction of the
class as SGLang's dynamic loader shapes it (``cls(storage_config, extra_config)``)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from typing import Any, Optional

import attrs

from hicache_core.config import HiCacheConfig, require_dynamic_keys, resolve_layout
from hicache_core.errors import BackendLoadError, ConfigError
from hicache_core.hookspecs import BackendRecord
from hicache_core.parse import parse_bool
from hicache_core.plugins import HiCachePluginManager, get_plugin_manager
from hicache_core.storage.base import StorageConfig
from hicache_core.storage.foreign import construct_sglang, is_sglang_backend

logger = logging.getLogger(__name__)

# Names the project ships as separate distributions: the install hint when one is asked for but absent.
KNOWN_PLUGINS = {
    "file": "hicache-plugin-file",
    "mooncake": "hicache-plugin-mooncake",
    "hf3fs": "hicache-plugin-hf3fs",
}
V0_METHODS = ("get", "set", "exists")
V1_METHODS = ("batch_get_v1", "batch_set_v1")


@attrs.frozen
class ResolvedBackend:
    """A backend name resolved to its class."""

    name: str
    cls: type
    interface_v1: bool
    page_first_only: bool
    origin: str  # distribution, or "dynamic"


def load_class(module_path: str, class_name: str, *, interface_v1: bool, what: str) -> type:
    """Import ``module_path`` and return ``class_name`` after checking it has the contract's methods."""
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        raise BackendLoadError(
            f"{what}: cannot import module {module_path!r} ({e}); install the package that provides it "
            "or put its directory on PYTHONPATH"
        ) from e
    except Exception as e:
        raise BackendLoadError(f"{what}: importing module {module_path!r} raised {type(e).__name__}: {e}") from e
    cls = getattr(module, class_name, None)
    if cls is None:
        public = sorted(n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_"))
        raise BackendLoadError(
            f"{what}: module {module_path!r} has no class {class_name!r}"
            + (f"; classes there: {', '.join(public)}" if public else "")
        )
    if not isinstance(cls, type):
        raise BackendLoadError(f"{what}: {module_path}.{class_name} is a {type(cls).__name__}, not a class")
    needed = V1_METHODS if interface_v1 else V0_METHODS
    missing = [m for m in needed if not callable(getattr(cls, m, None))]
    if interface_v1 and not (callable(getattr(cls, "batch_exists", None)) or callable(getattr(cls, "exists", None))):
        missing.append("batch_exists")
    if missing:
        kind = "v1 (interface_v1=1)" if interface_v1 else "v0 (interface_v1=0)"
        raise BackendLoadError(
            f"{what}: class {module_path}.{class_name} lacks {', '.join(missing)}, which a {kind} storage backend "
            f"implements; see docs/writing-a-backend.md"
            + ("" if interface_v1 else ", or set interface_v1=1 if it implements batch_get_v1/batch_set_v1")
        )
    return cls


def resolve(
    name: str, extra_config: Optional[dict] = None, pm: Optional[HiCachePluginManager] = None
) -> ResolvedBackend:
    """Find the class behind a backend name (``dynamic`` reads ``module_path``/``class_name`` from extra_config)."""
    extra = extra_config or {}
    if name == "dynamic":
        require_dynamic_keys(extra)
        v1 = parse_bool(extra.get("interface_v1", 0), "--hicache-storage-backend-extra-config: interface_v1")
        what = f"dynamic backend {extra['backend_name']!r}"
        cls = load_class(str(extra["module_path"]), str(extra["class_name"]), interface_v1=v1, what=what)
        return ResolvedBackend(
            str(extra["backend_name"]), cls, v1, bool(getattr(cls, "page_first_only", False)), "dynamic"
        )

    pm = pm or get_plugin_manager()
    table, _ = pm.offered_backends()
    offers = table.get(name)
    if not offers:
        failure = pm.failures.get(name)
        if failure is not None:
            raise BackendLoadError(
                f"storage backend {name!r}: plugin {failure.distribution} failed to load ({failure.error}); "
                + failure.fix.format(dist=failure.distribution)
            )
        hint = KNOWN_PLUGINS.get(name)
        known = ", ".join(sorted(table) + ["dynamic"])
        broken = "".join(
            f"; plugin {f.entry_point} ({f.distribution}) failed to load: {f.error}" for f in pm.failures.values()
        )
        raise BackendLoadError(
            f"unknown storage backend {name!r}; available: {known}"
            + (f"; to add it: pip install {hint}" if hint else "; run `hicache backends` to see what is installed")
            + broken
        )
    if len(offers) > 1:
        who = " and ".join(f"{o.distribution} ({o.record.target})" for o in offers)
        raise BackendLoadError(
            f"storage backend name {name!r} is claimed by {who}; uninstall one, or disable one with "
            "HICACHE_PLUGINS_DISABLE=<entry point or distribution name>"
        )
    rec: BackendRecord = offers[0].record
    _check_requirements(name, rec, offers[0].distribution)
    module_path, sep, class_name = rec.target.partition(":")
    if not sep:
        raise BackendLoadError(
            f"plugin {offers[0].distribution}: backend {name!r} target {rec.target!r} is not 'module:Class'"
        )
    what = f"storage backend {name!r} from {offers[0].distribution}"
    try:
        cls = load_class(module_path, class_name, interface_v1=rec.interface_v1, what=what)
    except BackendLoadError as e:
        if rec.install_hint:
            raise BackendLoadError(f"{e}; {rec.install_hint}") from e
        raise
    return ResolvedBackend(name, cls, rec.interface_v1, rec.page_first_only, offers[0].distribution)


def construct(cls: type, storage_config: StorageConfig, extra: dict, host_pool: Any = None) -> Any:
    """``cls(storage_config, extra)`` -- SGLang's dynamic shape -- or, for a class whose constructor takes fewer
    arguments (the seed's minimal backend may take none), ``cls(storage_config)`` or ``cls()``. A subclass of
    SGLang's own HiCacheStorage is built as SGLang builds it (:mod:`hicache_core.storage.foreign`)."""
    if is_sglang_backend(cls):
        return construct_sglang(cls, storage_config, extra, host_pool)
    try:
        params = [
            p
            for p in inspect.signature(cls).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        return cls(storage_config, extra)
    if any(p.kind == p.VAR_POSITIONAL for p in params) or len(params) >= 2:
        return cls(storage_config, extra)
    return cls(storage_config) if params else cls()


def _check_requirements(name: str, rec: BackendRecord, dist: str) -> None:
    """A record's ``requires`` modules must be importable: their absence is known before anything is built."""
    for module in rec.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise BackendLoadError(
                f"storage backend {name!r} from {dist} needs the module {module!r}, which is not installed"
                + (f"; {rec.install_hint}" if rec.install_hint else "")
            )


def check_layout(resolved: ResolvedBackend, layout: str) -> None:
    """The one home of the rule "this backend serves page-first host layouts only" (declared by its record, or by
    a dynamic class's ``page_first_only`` attribute)."""
    if resolved.page_first_only and layout == "layer_first":
        raise ConfigError(
            f"storage backend {resolved.name!r} serves only page_first/page_first_direct host layouts; "
            "use --hicache-mem-layout page_first (kernel io) or page_first_direct (direct io)"
        )


def resolve_config(
    config: HiCacheConfig, pm: Optional[HiCachePluginManager] = None
) -> tuple[HiCacheConfig, Optional[ResolvedBackend]]:
    """Resolve the configured backend once and apply the layout adjustments it implies (logged)."""
    name = config.hicache_storage_backend
    if not name:
        return resolve_layout(config), None
    resolved = resolve(name, config.hicache_storage_backend_extra_config, pm)
    config = resolve_layout(config, backend_page_first_only=resolved.page_first_only, backend_name=name)
    return config, resolved
