"""Pages as files: ``{root}/{namespace tag}/{key[:2]}/{key}.page``, each the core's page envelope (a 64-byte
header: magic, version, length, XXH3-64, key-and-namespace digest; :mod:`hicache_core.storage.envelope`) then the
page bytes. A page is served only when the envelope opens for the key asked; anything else (truncated, flipped,
foreign, swapped) is a miss, counted, and the bad file is removed so the page can be written again.

Writes go to a temporary file in the same directory and are renamed into place, so no reader -- in this process or
another one sharing the directory -- ever sees half a page, and a failed write leaves nothing visible. Temporary
files a crashed writer left behind are removed at start.

Trust: the default directory is per user (``$XDG_CACHE_HOME/hicache``, else ``/tmp/hicache-$UID``), created 0700,
and a directory owned by another user or writable by group or others is refused unless ``shared`` says it is
shared on purpose. The checksum catches accidents only; with ``mac_key`` (or ``$HICACHE_FILE_MAC_KEY``) every
page is signed (HMAC-SHA256) and pages from writers without the key are misses.

Capacity (``capacity_bytes``) is for the whole directory, across processes: the bytes in use are a counter file
(``.hicache-usage``) updated under ``flock``; a process over the limit evicts the oldest pages it knows, and
rescans the directory (every process's pages, by mtime) when it knows none.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import uuid
from collections import OrderedDict
from typing import Optional

import torch

from hicache_core.errors import ConfigError
from hicache_core.storage import HEADER_BYTES, EnvelopeError, HiCacheStorage, PageEnvelope, map_chunked
from hicache_core.storage.options import parse_options
from hicache_plugin_file.directory import (
    ENV_DIR,
    FileOptions,
    SharedUsage,
    remove_orphan,
    resolve_root,
    secure_directory,
)
from hicache_plugin_file.hooks import FileHooks
from hicache_plugin_file.quota import NamespaceQuota
from hicache_plugin_file.sglang_layout import SGLangFileLayout

logger = logging.getLogger(__name__)

ENV_MAC_KEY = "HICACHE_FILE_MAC_KEY"
VERSION = 2  # of the on-disk layout (namespace.json)
_HEX64 = re.compile(r"[0-9a-f]{64}")


class FileStorage(FileHooks, HiCacheStorage):
    """Extra config: ``storage_dir`` (else ``$SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR``, else SGLang's
    ``file_storage_path``, else ``$XDG_CACHE_HOME/hicache``, else ``/tmp/hicache-$UID``),
    ``capacity_bytes`` (0 = unlimited; LRU eviction of whole pages), ``io_threads`` (parallel page I/O in a batch,
    default 4, or the CPU cores where fewer), ``fsync`` (flush each page to disk before publishing it; default
    off), ``layout_compat`` (``"hicache"``, the default, or ``"sglang"``: SGLang HiCacheFile's files, see
    :mod:`.sglang_layout`)."""

    supports_namespace_quota = True  # --hicache-salt-storage-pages holds here, across processes (quota.py)

    def __new__(cls, storage_config=None, extra_config=None):
        opts = parse_options(FileOptions, extra_config or {}, "file backend")
        if opts.layout_compat == "sglang":
            return SGLangFileLayout(storage_config, extra_config)  # one L3 directory with SGLang servers
        return super().__new__(cls)

    def __init__(self, storage_config, extra_config=None) -> None:
        super().__init__(storage_config, extra_config)
        opts = self.options = parse_options(FileOptions, self.extra_config, "file backend")
        self.capacity_bytes, self.fsync = opts.capacity_bytes, opts.fsync
        self.io_threads = opts.io_threads or min(4, len(os.sched_getaffinity(0)))
        self.root = resolve_root(opts)
        secure_directory(self.root, opts.shared)
        self.tag = self.namespace.tag
        self.dir = os.path.join(self.root, self.tag)
        try:
            self._describe_namespace()
        except OSError as e:
            raise ConfigError(
                f"file backend: cannot use storage_dir {self.root!r}: {e.strerror}; "
                "give a writable directory in the extra config (storage_dir) or "
                f"${ENV_DIR}"
            ) from e
        mac = opts.mac_key or os.environ.get(ENV_MAC_KEY) or None
        self.envelope = PageEnvelope(self.tag, mac.encode() if mac else None)
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._stats = dict.fromkeys(
            "get_pages get_misses truncated foreign corrupt unsigned forged set_pages set_skipped set_failed "
            "evicted_pages orphans_removed bytes_read bytes_written".split(),
            0,
        )
        self._lru: OrderedDict[str, int] = OrderedDict()  # path -> bytes, oldest first
        self.usage: Optional[SharedUsage] = SharedUsage(self.root) if self.capacity_bytes else None
        self._scan(startup=True)
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._tmp_token, self._tmp_serial = uuid.uuid4().hex[:8], itertools.count()  # temporary files' names
        self._payload_bytes: Optional[int] = None
        self.quota = NamespaceQuota(self.dir, self._path, self._remove)

    # --- layout on disk ----------------------------------------------------------------------------------------------
    def _describe_namespace(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        meta = os.path.join(self.dir, "namespace.json")
        if not os.path.exists(meta):
            # named like a page's temporary file (pid first), so another process's start-up scan sees a live writer
            tmp = f"{meta}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "w") as f:
                json.dump({"tag": self.tag, "format_version": VERSION, **self.namespace.fields()}, f, indent=1)
            os.replace(tmp, meta)

    def _path(self, key: str) -> str:
        name = key if _HEX64.fullmatch(key) else hashlib.sha256(key.encode()).hexdigest()
        return f"{self.dir}/{name[:2]}/{name}.page"

    # --- one page ----------------------------------------------------------------------------------------------------
    def _write(self, key: str, segments: list) -> bool:
        """Publish one page atomically; True if it is (or already was) visible."""
        path = self._path(key)
        if os.path.exists(path):
            self._count("set_skipped")
            self._touch(path)
            return True
        payload = sum(map(len, segments))
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.{self._tmp_token}{next(self._tmp_serial):x}.tmp"
        try:
            fd = self._create(tmp)
            try:
                data = [self.envelope.seal(key, segments), *segments]
                written = os.writev(fd, data)
                if written != HEADER_BYTES + payload:  # short write: finish it or give up
                    rest = b"".join(bytes(s) for s in data)[written:]
                    while rest:
                        n = os.write(fd, rest)
                        rest = rest[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("file backend: writing %s failed: %s", path, e)
            self._count("set_failed")
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        with self._lock:
            self._stats["set_pages"] += 1
            self._stats["bytes_written"] += payload
        self._account(path, HEADER_BYTES + payload)
        return True

    def _create(self, tmp: str) -> int:
        """Open a new temporary page file; its directories are made only when the first try finds them missing
        (a fresh store, or one that clear() -- ours or another process's -- emptied)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            self._describe_namespace()
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            return os.open(tmp, flags, 0o644)

    def _read(self, key: str, segments: list) -> bool:
        """Read one page into ``segments`` (writable buffers); True only if every check passes. Successes are
        counted by the caller, a batch at a time (:meth:`_tally`): the per-page path takes no lock."""
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            if not isinstance(e, FileNotFoundError):
                logger.warning("file backend: cannot open %s: %s", path, e)
            self._count("get_misses")
            return False
        edge = bytearray(HEADER_BYTES + 1)  # the header, then one byte that catches a file longer than it says
        view = memoryview(edge)
        try:
            n = os.preadv(fd, [view[:HEADER_BYTES], *segments, view[HEADER_BYTES:]], 0)
        except OSError as e:
            logger.warning("file backend: reading %s failed: %s", path, e)
            self._count("get_misses")
            return False
        finally:
            os.close(fd)
        try:
            self.envelope.check(key, view[:HEADER_BYTES], segments, sum(map(len, segments)), n)
        except EnvelopeError as e:
            logger.warning("file backend: %s is unusable (%s): treated as a miss and removed", path, e)
            self._count(e.kind)
            self._remove(path)
            return False
        if self.capacity_bytes:
            self._touch(path)
        return True

    def _tally(self, results: list[bool], page_bytes: int) -> list[bool]:
        """Count a batch's pages read."""
        got = sum(results)
        with self._lock:
            self._stats["get_pages"] += got
            self._stats["bytes_read"] += got * page_bytes
        return results

    def _remove(self, path: str) -> None:
        """Remove a page file; the directory's usage drops only if this call removed it."""
        try:
            os.unlink(path)
        except OSError:
            removed = False
        else:
            removed = True
        with self._lock:
            size = self._lru.pop(path, None)
        if removed and self.usage is not None:
            self.usage.add(-(size if size is not None else 0))

    # --- capacity (LRU of whole pages, for the whole directory) ------------------------------------------------------
    def _scan(self, startup: bool = False) -> None:
        """Learn the pages on disk (every namespace and process shares the capacity), oldest first by mtime. At
        start, also remove temporary files crashed writers left and set the directory's usage counter."""
        found, total = [], 0
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                p = os.path.join(dirpath, f)
                if f.endswith(".page") and (self.capacity_bytes or not startup):
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    found.append((st.st_mtime, p, st.st_size))
                    total += st.st_size
                elif startup and f.endswith(".tmp") and remove_orphan(p):
                    self._count("orphans_removed")
        if not self.capacity_bytes:
            return
        with self._lock:
            self._lru.clear()
            for _, p, size in sorted(found):
                self._lru[p] = size
        if startup and self.usage is not None:
            self.usage.set(total)

    def _touch(self, path: str) -> None:
        if not self.capacity_bytes:
            return
        with self._lock:
            if path in self._lru:
                self._lru.move_to_end(path)
        try:
            os.utime(path)  # other processes sharing the directory see the recency too
        except OSError:
            pass

    def _account(self, path: str, size: int) -> None:
        """A page was published: count it and evict the oldest pages while the directory is over capacity."""
        if self.usage is None:
            return
        with self._lock:
            self._lru[path] = size
            self._lru.move_to_end(path)
        total = self.usage.add(size)
        if total <= self.capacity_bytes:
            return
        with self._evict_lock:
            rescanned = False
            while self.usage.value() > self.capacity_bytes:
                with self._lock:
                    victim = next(iter(self._lru), None)
                if victim is None or victim == path:
                    if rescanned:
                        break
                    self._scan()  # pages other processes wrote: this process knows none of its own to drop
                    rescanned = True
                    continue
                with self._lock:
                    vsize = self._lru.pop(victim, 0)
                try:
                    os.unlink(victim)
                except FileNotFoundError:
                    continue  # another process evicted it (and counted it)
                except OSError as e:
                    logger.warning("file backend: cannot evict %s: %s", victim, e)
                    continue
                self.usage.add(-vsize)
                self._count("evicted_pages")

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    # --- batches -----------------------------------------------------------------------------------------------------
    def _map(self, fn, keys, segments) -> list:
        """Run ``fn`` over the pages, one contiguous chunk per I/O thread."""
        if self._pool is None and self.io_threads > 1 and len(keys) > 1:
            self._pool = cf.ThreadPoolExecutor(self.io_threads, thread_name_prefix="hicache-file")
        return map_chunked(self._pool, self.io_threads, len(keys), lambda i: fn(keys[i], segments[i]))

    def batch_get_v1(self, keys, host_indices) -> list[bool]:
        pool = self.mem_pool_host
        return self._tally(self._map(self._read, keys, pool.page_memoryviews(host_indices)), pool.page_bytes)

    def batch_set_v1(self, keys, host_indices, extra_info=None) -> list[bool]:
        return self._quota(
            keys, self._map(self._write, keys, self.mem_pool_host.page_memoryviews(host_indices)), extra_info
        )

    def _quota(self, keys, results: list[bool], extra_info) -> list[bool]:
        ns = getattr(extra_info, "extra_info", None) or {}
        if "namespace_seed" in ns:  # a cache_salt / extra_key namespace with a storage quota (quota.py)
            results = self.quota.enforce(ns["namespace_seed"], ns.get("namespace_storage_pages"), keys, results)
        return results

    # --- blobs (the L3 codec's values: a page file of any payload length) --------------------------------------------
    def batch_set_blobs(self, keys, blobs, extra_info=None) -> list[bool]:
        return self._quota(keys, self._map(self._write, keys, [[memoryview(b)] for b in blobs]), extra_info)

    def _read_blob(self, key: str, max_bytes: int) -> Optional[bytearray]:
        try:
            size = os.stat(self._path(key)).st_size - HEADER_BYTES
        except OSError:
            self._count("get_misses")
            return None
        buf = bytearray(min(max(size, 0), max_bytes))  # a file of another length fails the envelope's check
        return buf if self._read(key, [memoryview(buf)]) else None

    def batch_get_blobs(self, keys, max_bytes) -> list:
        out = self._map(lambda k, _: self._read_blob(k, max_bytes), keys, keys)
        with self._lock:
            self._stats["get_pages"] += sum(b is not None for b in out)
            self._stats["bytes_read"] += sum(len(b) for b in out if b is not None)
        return out

    def batch_exists(self, keys) -> int:
        for i, k in enumerate(keys):
            if not os.path.exists(self._path(k)):
                return i
        return len(keys)

    def exists(self, key) -> bool:
        return os.path.exists(self._path(key))

    # --- v0 ----------------------------------------------------------------------------------------------------------
    def get(self, key, target_location=None):
        if self.mem_pool_host is None:
            raise RuntimeError("register_mem_pool_host() first")
        n = self.mem_pool_host.page_bytes
        if target_location is not None and target_location.numel() * target_location.element_size() == n:
            out = target_location
        else:
            out = torch.empty(n // self.mem_pool_host.spec.itemsize, dtype=self.mem_pool_host.dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        return out if self._tally([self._read(key, [buf])], n)[0] else None

    def set(self, key, value) -> bool:
        data = value.contiguous().view(-1).view(torch.uint8).numpy()
        return self._write(key, [memoryview(data)])

    # --- housekeeping ------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Delete this namespace's pages (other namespaces in the directory keep theirs), and the namespace's
        directory once nothing else is in it."""
        for dirpath, _, files in os.walk(self.dir, topdown=False):
            for f in files:
                if f.endswith(".page") or f.endswith(".tmp"):
                    self._remove(os.path.join(dirpath, f))
            if dirpath != self.dir:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # only succeeds when empty
        with contextlib.suppress(OSError):
            if os.listdir(self.dir) == ["namespace.json"]:
                os.unlink(os.path.join(self.dir, "namespace.json"))
                os.rmdir(self.dir)

    def get_stats(self):
        with self._lock:
            stats = dict(self._stats)
        stats["used_bytes"] = self.usage.value() if self.usage is not None else None
        return stats

    def describe(self) -> str:
        return f"directory {self.dir}"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.usage is not None:
            self.usage.close()
