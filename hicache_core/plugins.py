"""The plugin manager: the core's built-ins plus every entry point of group ``hicache``.

Environment:

* ``HICACHE_PLUGINS`` -- comma-separated allowlist of entry-point or distribution names; when set, only these load.
* ``HICACHE_PLUGINS_DISABLE`` -- comma-separated denylist, applied after the allowlist.

A plugin that fails to import, or implements a hook hicache does not define (a misspelling), is reported with a
warning at discovery, listed by ``hicache backends``, and named when a backend that is not found is selected
(the error then carries the failure and the fix).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from importlib import metadata
from typing import Optional

import attrs
import pluggy

from hicache_core import hookspecs
from hicache_core.hookspecs import BackendRecord

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hicache"
ALLOW_ENV = "HICACHE_PLUGINS"
DENY_ENV = "HICACHE_PLUGINS_DISABLE"
BUILTIN_MODULES = ("hicache_core.storage.builtin",)
CORE_DIST = "hicache-core"


@attrs.frozen
class PluginFailure:
    entry_point: str
    distribution: str
    error: str
    fix: str = "reinstall it (pip install --force-reinstall {dist}) or fix its dependencies"


@attrs.frozen
class OfferedBackend:
    record: BackendRecord
    distribution: str
    version: str


def _names(env: str) -> Optional[set[str]]:
    raw = os.environ.get(env)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


class HiCachePluginManager(pluggy.PluginManager):
    """A pluggy manager that knows which distribution each plugin came from."""

    def __init__(self, load_entry_points: bool = True) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}  # plugin name -> distribution
        self.failures: dict[str, PluginFailure] = {}  # entry-point name -> why it did not load
        for mod in BUILTIN_MODULES:
            self.register(importlib.import_module(mod), name=mod)
            self.distributions[mod] = CORE_DIST
        if load_entry_points:
            self.load_entry_points()

    def load_entry_points(self) -> None:
        allow, deny = _names(ALLOW_ENV), _names(DENY_ENV) or set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            if allow is not None and ep.name not in allow and dist not in allow:
                continue
            if ep.name in deny or dist in deny:
                logger.info("plugin %s (%s) disabled by %s", ep.name, dist, DENY_ENV)
                continue
            if self.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                self.register(plugin, name=ep.name)
            except Exception as e:  # a broken plugin must not break the others
                self._fail(ep.name, dist, f"{type(e).__name__}: {e}")
                continue
            unknown = self._unknown_hooks(ep.name)
            if unknown:
                self.unregister(name=ep.name)
                self._fail(
                    ep.name,
                    dist,
                    "; ".join(unknown),
                    f"its author must rename the hook; until then disable it with {DENY_ENV}={ep.name}",
                )
                continue
            self.distributions[ep.name] = dist
        self.check_pending()  # anything registered past the checks above fails here, loudly

    def _fail(self, name: str, dist: str, msg: str, fix: Optional[str] = None) -> None:
        logger.warning("hicache plugin %r from %s failed to load: %s", name, dist, msg)
        self.failures[name] = PluginFailure(name, dist, msg, *([fix] if fix else []))

    def _unknown_hooks(self, plugin_name: str) -> list[str]:
        """Hook implementations of ``plugin_name`` that match no hicache hook spec (pluggy would accept them
        silently until check_pending), each with the nearest real hook name."""
        out = []
        for name, caller in vars(self.hook).items():
            if caller.spec is not None or not any(i.plugin_name == plugin_name for i in caller.get_hookimpls()):
                continue
            near = difflib.get_close_matches(name, hookspecs.HOOK_NAMES, n=1)
            out.append(
                f"implements unknown hook {name!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; hicache's hooks: {', '.join(hookspecs.HOOK_NAMES)}"
            )
        return out

    def offered_backends(self) -> tuple[dict[str, list[OfferedBackend]], list[PluginFailure]]:
        """Every backend record by name (more than one entry = a conflict), and plugins whose hook raised."""
        table: dict[str, list[OfferedBackend]] = {}
        broken: list[PluginFailure] = []
        for impl in self.hook.hicache_storage_backends.get_hookimpls():
            dist = self.distributions.get(impl.plugin_name, impl.plugin_name)
            try:
                records: list = list(impl.function() or ())  # type: ignore[call-overload]  # plugin code
            except Exception as e:
                broken.append(PluginFailure(impl.plugin_name, dist, f"{type(e).__name__}: {e}"))
                continue
            for rec in records:
                if not isinstance(rec, BackendRecord):
                    broken.append(PluginFailure(impl.plugin_name, dist, f"yielded {rec!r}, not a BackendRecord"))
                    continue
                table.setdefault(rec.name, []).append(OfferedBackend(rec, dist, _dist_version(dist)))
        return table, broken


_default: Optional[HiCachePluginManager] = None


def get_plugin_manager(refresh: bool = False) -> HiCachePluginManager:
    """The process-wide plugin manager (built on first use; ``refresh=True`` rediscovers entry points)."""
    global _default
    if _default is None or refresh:
        _default = HiCachePluginManager()
    return _default
