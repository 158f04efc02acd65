"""The storage backend contract and what plugins may use from the core.

Plugins import from here only: the contract (:class:`HiCacheStorage`, :class:`StorageConfig`, :class:`StorageV1`),
the page envelope file-like stores share (:class:`PageEnvelope`), chunked parallel page I/O (:func:`map_chunked`)
and the config value parsers (:func:`parse_bool`, :func:`parse_size`).
"""

from hicache_core.parse import parse_bool, parse_size
from hicache_core.storage.adapter import NamespacedBackend, V0Adapter
from hicache_core.storage.base import ExtraInfo, HiCacheStorage, StorageConfig, StorageV1
from hicache_core.storage.envelope import HEADER_BYTES, EnvelopeError, PageEnvelope, checksum
from hicache_core.storage.parallel import map_chunked

__all__ = [
    "HEADER_BYTES",
    "EnvelopeError",
    "ExtraInfo",
    "HiCacheStorage",
    "NamespacedBackend",
    "PageEnvelope",
    "StorageConfig",
    "StorageV1",
    "V0Adapter",
    "checksum",
    "map_chunked",
    "parse_bool",
    "parse_size",
]
