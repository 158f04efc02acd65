"""The few exception types users see. Each message says what failed and how to fix it."""

from __future__ import annotations


class HiCacheError(Exception):
    """Base of every error hicache raises on purpose; the CLI prints these without a traceback."""


class ConfigError(HiCacheError, ValueError):
    """A flag, JSON document or config value is invalid."""


class BackendLoadError(HiCacheError):
    """A storage backend could not be found, imported or constructed."""


class StorageError(HiCacheError):
    """A storage backend failed at run time (I/O error, corrupt data, timeout)."""
