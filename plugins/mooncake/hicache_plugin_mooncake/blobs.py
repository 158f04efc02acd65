"""The L3 codec's values on Mooncake (``"codec"`` in the extra config): one object a page under ``..._z``, moved by
copy (``put_batch`` / ``get_batch``) rather than from the registered host pool, since its length is the encoded
page's. A put of a key the master already holds is refused; that page counts as stored, as for whole pages."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def put_blobs(backend: Any, keys: list[str], blobs: list) -> list[bool]:
    """Store each blob under its object key; True where the store holds it afterwards."""
    if not keys:
        return []
    try:
        with backend._client() as store:
            if store.put_batch(keys, blobs, backend.replicate) == 0:
                ok = [True] * len(keys)
            else:  # one key refused fails the batch: ask key by key, a key already stored being stored
                ok = [store.put(k, b, backend.replicate) == 0 or store.is_exist(k) == 1 for k, b in zip(keys, blobs)]
    except Exception as e:
        logger.warning("mooncake backend: put_batch raised %s", e)
        ok = [False] * len(keys)
    if any(ok):
        backend._health(True)
    good = sum(ok)
    backend._count("set_pages", good)
    backend._count("set_failed", len(keys) - good)
    backend._count("bytes_written", sum(len(b) for b, g in zip(blobs, ok) if g))
    return ok


def get_blobs(backend: Any, keys: list[str], max_bytes: int) -> list:
    """Each object's bytes, or None where it is missing or longer than ``max_bytes``."""
    if not keys:
        return []
    try:
        with backend._client() as store:
            got = list(store.get_batch(keys))
    except Exception as e:
        logger.warning("mooncake backend: get_batch raised %s", e)
        backend._count("get_misses", len(keys))
        return [None] * len(keys)
    out = [b if isinstance(b, bytes) and 0 < len(b) <= max_bytes else None for b in got[: len(keys)]]
    out += [None] * (len(keys) - len(out))
    good = sum(b is not None for b in out)
    backend._health(good > 0 or len(got) == len(keys))
    backend._count("get_pages", good)
    backend._count("get_misses", len(keys) - good)
    backend._count("bytes_read", sum(len(b) for b in out if b is not None))
    return out
