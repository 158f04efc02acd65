"""Pages as files: ``{root}/{namespace tag}/{key[:2]}/{key}.page``, each the core's page envelope (a 64-byte
header: magic, version, length, XXH3-64, key-and-namespace digest; :mod:`hicache_core.storage.envelope`) then the
page bytes. A page is served only when the envelope opens for the key asked; anything else (truncated, flipped,
foreign, swapped) is a miss, counted, and the bad file is removed so the page can be written again.

Writes go to a temporary file in the same directory and are renamed into place, so no reader -- in this process or
another one sharing the directory -- ever sees half a page, and a failed write leaves nothing visible.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
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
from hicache_core.storage import HEADER_BYTES, EnvelopeError, HiCacheStorage, PageEnvelope, map_chunked, parse_bool
from hicache_plugin_file.sglang_layout import SGLangFileLayout

logger = logging.getLogger(__name__)

ENV_DIR = "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"
DEFAULT_DIR = "/tmp/hicache"
VERSION = 2  # of the on-disk layout (namespace.json)
_HEX64 = re.compile(r"[0-9a-f]{64}")


class FileStorage(HiCacheStorage):
    """Extra config: ``storage_dir`` (else ``$SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR``, else /tmp/hicache),
    ``capacity_bytes`` (0 = unlimited; LRU eviction of whole pages), ``io_threads`` (parallel page I/O in a batch,
    default 4), ``fsync`` (flush each page to disk before publishing it; default off), ``layout_compat``
    (``"hicache"``, the default, or ``"sglang"``: SGLang HiCacheFile's files, see :mod:`.sglang_layout`)."""

    def __new__(cls, storage_config=None, extra_config=None):
        compat = (extra_config or {}).get("layout_compat", "hicache")
        if compat == "sglang":
            return SGLangFileLayout(storage_config, extra_config)  # one L3 directory with SGLang servers
        if compat != "hicache":
            raise ConfigError(f"file backend: layout_compat={compat!r}; choose 'hicache' (the default, checksummed "
                              "pages) or 'sglang' (SGLang HiCacheFile's files)")
        return super().__new__(cls)

    def __init__(self, storage_config, extra_config=None) -> None:
        super().__init__(storage_config, extra_config)
        ex = self.extra_config
        root = ex.get("storage_dir") or os.environ.get(ENV_DIR) or DEFAULT_DIR
        try:
            self.capacity_bytes = int(ex.get("capacity_bytes", 0))
            self.io_threads = max(1, int(ex.get("io_threads", 4)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"file backend: capacity_bytes and io_threads must be integers ({e})") from e
        self.fsync = parse_bool(ex.get("fsync", False), "file backend: fsync")
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.tag = self.namespace.tag
        self.dir = os.path.join(self.root, self.tag)
        try:
            self._describe_namespace()
        except OSError as e:
            raise ConfigError(f"file backend: cannot use storage_dir {self.root!r}: {e.strerror}; "
                              "give a writable directory in the extra config (storage_dir) or "
                              f"${ENV_DIR}") from e
        self.envelope = PageEnvelope(self.tag)
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(
            ("get_pages", "get_misses", "truncated", "foreign", "corrupt", "set_pages", "set_skipped",
             "set_failed", "evicted_pages", "bytes_read", "bytes_written"), 0)
        self._lru: OrderedDict[str, int] = OrderedDict()  # path -> bytes, oldest first
        self._used = 0
        if self.capacity_bytes:
            self._scan()
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._payload_bytes: Optional[int] = None

    # --- layout on disk ----------------------------------------------------------------------------------------------
    def _describe_namespace(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self._described = True
        meta = os.path.join(self.dir, "namespace.json")
        if not os.path.exists(meta):
            tmp = f"{meta}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "w") as f:
                json.dump({"tag": self.tag, "format_version": VERSION, **self.namespace.fields()}, f, indent=1)
            os.replace(tmp, meta)

    def _path(self, key: str) -> str:
        name = key if _HEX64.fullmatch(key) else hashlib.sha256(key.encode()).hexdigest()
        return os.path.join(self.dir, name[:2], name + ".page")

    # --- one page ----------------------------------------------------------------------------------------------------
    def _write(self, key: str, segments: list) -> bool:
        """Publish one page atomically; True if it is (or already was) visible."""
        path = self._path(key)
        if os.path.exists(path):
            self._count("set_skipped")
            self._touch(path)
            return True
        payload = sum(len(s) for s in segments)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            if not self._described:  # clear() removed the namespace directory
                self._describe_namespace()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
        self._count("set_pages")
        self._count("bytes_written", payload)
        self._account(path, HEADER_BYTES + payload)
        return True

    def _read(self, key: str, segments: list) -> bool:
        """Read one page into ``segments`` (writable buffers); True only if every check passes."""
        path = self._path(key)
        expect = sum(len(s) for s in segments)
        header = bytearray(HEADER_BYTES)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._count("get_misses")
            return False
        except OSError as e:
            logger.warning("file backend: cannot open %s: %s", path, e)
            self._count("get_misses")
            return False
        try:
            tail = bytearray(1)  # catches a file longer than its header says, in the same call
            n = os.preadv(fd, [header, *segments, tail], 0)
            self.envelope.open(key, header, segments, min(n, HEADER_BYTES + expect))
            if n > HEADER_BYTES + expect:
                raise EnvelopeError("foreign", "file is longer than its header says")
        except EnvelopeError as e:
            logger.warning("file backend: %s is unusable (%s): treated as a miss and removed", path, e)
            self._count(e.kind)
            self._remove(path)
            return False
        except OSError as e:
            logger.warning("file backend: reading %s failed: %s", path, e)
            self._count("get_misses")
            return False
        finally:
            os.close(fd)
        self._count("get_pages")
        self._count("bytes_read", expect)
        self._touch(path)
        return True

    def _remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
        with self._lock:
            size = self._lru.pop(path, None)
            if size:
                self._used -= size

    # --- capacity (LRU of whole pages) -------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Learn the pages already on disk (all namespaces share the capacity), oldest first by mtime."""
        found = []
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                if f.endswith(".page"):
                    p = os.path.join(dirpath, f)
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    found.append((st.st_mtime, p, st.st_size))
        with self._lock:
            self._lru.clear()
            self._used = 0
            for _, p, size in sorted(found):
                self._lru[p] = size
                self._used += size

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
        if not self.capacity_bytes:
            return
        victims = []
        with self._lock:
            if path not in self._lru:
                self._used += size
            self._lru[path] = size
            self._lru.move_to_end(path)
            while self._used > self.capacity_bytes and len(self._lru) > 1:
                victim, vsize = self._lru.popitem(last=False)
                self._used -= vsize
                victims.append(victim)
        for v in victims:
            try:
                os.unlink(v)
                self._count("evicted_pages")
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("file backend: cannot evict %s: %s", v, e)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    # --- batches -----------------------------------------------------------------------------------------------------
    def _map(self, fn, keys, segments) -> list[bool]:
        """Run ``fn`` over the pages, one contiguous chunk per I/O thread."""
        if self._pool is None and self.io_threads > 1 and len(keys) > 1:
            self._pool = cf.ThreadPoolExecutor(self.io_threads, thread_name_prefix="hicache-file")
        return map_chunked(self._pool, self.io_threads, len(keys), lambda i: fn(keys[i], segments[i]))

    def batch_get_v1(self, keys, host_indices) -> list[bool]:
        return self._map(self._read, keys, self.mem_pool_host.page_memoryviews(host_indices))

    def batch_set_v1(self, keys, host_indices) -> list[bool]:
        return self._map(self._write, keys, self.mem_pool_host.page_memoryviews(host_indices))

    def batch_exists(self, keys) -> int:
        for i, k in enumerate(keys):
            if not os.path.exists(self._path(k)):
                return i
        return len(keys)

    def exists(self, key) -> bool:
        return os.path.exists(self._path(key))

    # --- v0 ----------------------------------------------------------------------------------------------------------
    def _page_len(self) -> int:
        if self.mem_pool_host is not None:
            return self.mem_pool_host.page_bytes
        raise RuntimeError("register_mem_pool_host() first")

    def get(self, key, target_location=None):
        n = self._page_len()
        if target_location is not None and target_location.numel() * target_location.element_size() == n:
            out = target_location
        else:
            out = torch.empty(n // self.mem_pool_host.spec.itemsize, dtype=self.mem_pool_host.dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        return out if self._read(key, [buf]) else None

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
                self._described = False

    def get_stats(self):
        with self._lock:
            return dict(self._stats, used_bytes=self._used if self.capacity_bytes else None)

    def describe(self) -> str:
        return f"directory {self.dir}"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # --- benchmark baseline ------------------------------------------------------------------------------------------
    def bench_baseline(self):
        """The plain loop the benchmark compares with: os.write / readinto of the same bytes, same directory."""
        return PlainFileLoop(os.path.join(self.root, "bench-baseline"), self.mem_pool_host)


class PlainFileLoop:
    """One file per page written with os.write and read with readinto, no header, no checksum, one thread."""

    name = "os.write/readinto loop"

    def __init__(self, directory: str, pool) -> None:
        self.dir, self.pool = directory, pool
        os.makedirs(directory, exist_ok=True)

    def set(self, keys, host_indices) -> None:
        for key, segs in zip(keys, self.pool.page_memoryviews(host_indices)):
            fd = os.open(os.path.join(self.dir, key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for s in segs:
                    os.write(fd, s)
            finally:
                os.close(fd)

    def get(self, keys, host_indices) -> None:
        for key, segs in zip(keys, self.pool.page_memoryviews(host_indices)):
            with open(os.path.join(self.dir, key), "rb", buffering=0) as f:
                for s in segs:
                    f.readinto(s)

    def cleanup(self) -> None:
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
