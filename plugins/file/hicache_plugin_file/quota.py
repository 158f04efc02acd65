"""Per-namespace storage quota for the file backend, shared by every process on the directory.

The core passes a salted (``cache_salt`` / ``extra_key``) write's namespace seed and cap in the call's extra info
(``namespace_seed``, ``namespace_storage_pages``). Each page written for a namespace leaves an empty marker file
``{namespace dir}/quota/{seed}/{page name}.mark``; after a write, the writer takes the namespace's lock
(``flock`` on ``.lock`` there, so concurrent writers in any process count one at a time), lists the markers and,
while there are more than the cap, removes the oldest page and its marker: a namespace over its quota loses its
own oldest pages, never another's. A marker whose page is already gone (capacity eviction, ``clear``) is pruned
without counting."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Callable

logger = logging.getLogger(__name__)
_SEED = re.compile(r"[0-9a-f]{64}")


class NamespaceQuota:
    def __init__(self, namespace_dir: str, page_path: Callable[[str], str], remove: Callable[[str], None]) -> None:
        self.base = os.path.join(namespace_dir, "quota")
        self.page_path, self.remove = page_path, remove

    def enforce(self, seed: object, cap: object, keys: list[str], results: list[bool]) -> list[bool]:
        """After a write of ``keys`` for namespace ``seed``: record the pages that landed, trim the namespace to
        ``cap`` pages (oldest first). Pages of this write that were trimmed answer False."""
        if not isinstance(seed, str) or not _SEED.fullmatch(seed) or not isinstance(cap, int) or cap <= 0:
            logger.warning("file backend: ignoring a malformed namespace quota (seed %r, cap %r)", seed, cap)
            return results
        d = os.path.join(self.base, seed)
        os.makedirs(d, exist_ok=True)
        mine = {}
        for key, ok in zip(keys, results):
            if ok:
                marker = os.path.join(d, os.path.basename(self.page_path(key))[: -len(".page")] + ".mark")
                with open(marker, "a"):
                    os.utime(marker)  # a page written again is the newest again
                mine[marker] = key
        trimmed = set()
        with open(os.path.join(d, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            markers = []
            for name in os.listdir(d):
                if name.endswith(".mark"):
                    with contextlib.suppress(FileNotFoundError):
                        markers.append((os.stat(os.path.join(d, name)).st_mtime_ns, name))
            markers.sort()
            live = len(markers)
            for _, name in markers:
                if live <= cap:
                    break
                marker = os.path.join(d, name)
                page = self.page_path(name[: -len(".mark")])
                if os.path.exists(page):
                    self.remove(page)
                    if marker in mine:
                        trimmed.add(mine[marker])
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(marker)
                live -= 1
        return [ok and k not in trimmed for k, ok in zip(keys, results)]
