"""The hf3fs backend: per namespace, one big preallocated file ``{file_path_prefix}.{namespace tag}.bin`` cut into
slots of ``slot_bytes`` (the core's 64-byte page envelope, then the page, rounded up to 4 KiB); a metadata service
maps keys to slots.

Write: reserve slots (new keys only) -> write header + page -> confirm; only confirmed keys are visible, and a slot
whose write failed goes back to the free list. Read: look up slots -> read header + page straight into the host
pool -> open the envelope (magic, key digest, length, XXH3-64). A slot reused for another key between lookup and
read (LRU eviction by another instance) fails the check and is a miss, never another page's bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Optional

import torch

from hicache_core.errors import BackendLoadError, ConfigError
from hicache_core.storage import HEADER_BYTES, EnvelopeError, HiCacheStorage, PageEnvelope
from hicache_plugin_hf3fs.client import FileClient, make_client
from hicache_plugin_hf3fs.config import Hf3fsConfig
from hicache_plugin_hf3fs.metadata import HttpMetadataClient, LocalMetadataClient, MetadataStore

logger = logging.getLogger(__name__)
HEADER = HEADER_BYTES
ALIGN = 4096

_FAILED = object()  # what _meta_call returns when the metadata service failed
_LOCAL: dict[str, MetadataStore] = {}  # in-process metadata, shared by instances on the same files
_LOCAL_LOCK = threading.Lock()


class Hf3fsStorage(HiCacheStorage):
    """Extra config: ``file_path_prefix``, ``file_size``, ``numjobs``, ``entries``, ``metadata_server_url`` (else the
    JSON at ``$SGLANG_HICACHE_HF3FS_CONFIG_PATH``, else SGLang's single-machine defaults), ``io_client``
    (auto | usrbio | posix)."""

    def __init__(self, storage_config, extra_config=None) -> None:
        super().__init__(storage_config, extra_config)
        self.cfg = Hf3fsConfig.load(self.extra_config)
        self.io_kind = self.cfg.io_client
        self.rank_id = self.namespace.tag  # carries the tp rank for MHA; MLA ranks share one file
        self.path = f"{self.cfg.file_path_prefix}.{self.rank_id}.bin"
        if self.cfg.metadata_server_url:
            self.meta: Any = HttpMetadataClient(self.cfg.metadata_server_url, token=self.cfg.metadata_auth_token)
        else:
            key = os.path.abspath(self.cfg.file_path_prefix)
            with _LOCAL_LOCK:
                store = _LOCAL.setdefault(key, MetadataStore())
            self.meta = LocalMetadataClient(store)
        self.client: Optional[FileClient] = None
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(
            (
                "get_pages",
                "get_misses",
                "corrupt",
                "set_pages",
                "set_skipped",
                "set_failed",
                "metadata_errors",
                "lease_expired",
                "bytes_read",
                "bytes_written",
            ),
            0,
        )
        self.envelope = PageEnvelope(self.rank_id)

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.page_bytes = mem_pool_host.page_bytes
        self.slot_bytes = -(-(HEADER + self.page_bytes) // ALIGN) * ALIGN
        self.num_slots = self.cfg.file_size // self.slot_bytes
        if self.num_slots < 1:
            raise ConfigError(
                f"hf3fs: file_size {self.cfg.file_size} holds no slot of {self.slot_bytes} bytes "
                f"(one page + header); raise file_size (from {self.cfg.source})"
            )
        try:
            self.client = make_client(
                self.path,
                self.num_slots * self.slot_bytes,
                self.cfg.numjobs,
                self.cfg.entries,
                self.slot_bytes,
                self.io_kind,
            )
        except (OSError, ValueError) as e:
            raise BackendLoadError(
                f"hf3fs: cannot open {self.path!r}: {e}; check file_path_prefix (from {self.cfg.source})"
            ) from e
        try:
            self.meta.initialize(self.rank_id, self.num_slots)
        except Exception as e:
            raise BackendLoadError(f"hf3fs: metadata service refused initialize: {e}") from e

    # --- helpers -----------------------------------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _meta_call(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            logger.warning("hf3fs: metadata call %s failed: %s", getattr(fn, "__name__", fn), e)
            self._count("metadata_errors")
            return _FAILED

    # --- core paths --------------------------------------------------------------------------------------------------
    def _write_pages(self, keys: list[str], segments: list[list]) -> list[bool]:
        res = self._meta_call(self.meta.reserve_and_allocate_page_indices, self.rank_id, list(keys))
        if res is _FAILED:
            return [False] * len(keys)
        todo = [(i, slot) for i, (exists, slot) in enumerate(res) if not exists and slot >= 0]
        ops = [(slot * self.slot_bytes, [self.envelope.seal(keys[i], segments[i]), *segments[i]]) for i, slot in todo]
        assert self.client is not None  # registered
        results = self.client.batch_write(ops) if ops else []
        written, release, ok = [], [], [bool(e) for e, _ in res]
        for (i, slot), r in zip(todo, results):
            if r == HEADER + self.page_bytes:
                written.append((keys[i], slot))
                ok[i] = True
            else:
                release.append(slot)
        if written or release:
            rejected = self._meta_call(self.meta.confirm_write, self.rank_id, written, release)
            if rejected is _FAILED and written:
                return [e for e, _ in res]  # unconfirmed writes are not visible
            if rejected:  # the lease expired before the confirm: the slot may be another writer's now
                refused = set(rejected)
                for key, _ in written:
                    if key in refused:
                        ok[keys.index(key)] = False
                written = [w for w in written if w[0] not in refused]
                self._count("lease_expired", len(refused))
        self._count("set_pages", len(written))
        self._count("set_skipped", sum(1 for e, _ in res if e))
        self._count("set_failed", len(release) + sum(1 for e, s in res if not e and s < 0))
        self._count("bytes_written", len(written) * self.page_bytes)
        return ok

    def _read_pages(self, keys: list[str], segments: list[list]) -> list[bool]:
        slots = self._meta_call(self.meta.get_page_indices, self.rank_id, list(keys))
        if slots is _FAILED:
            return [False] * len(keys)
        todo = [(i, s) for i, s in enumerate(slots) if s is not None]
        heads = [bytearray(HEADER) for _ in todo]
        ops = [(s * self.slot_bytes, [h, *segments[i]]) for (i, s), h in zip(todo, heads)]
        expect = HEADER + self.page_bytes

        def check(j: int, n: int) -> bool:  # in the I/O thread that read op j
            i = todo[j][0]
            if n != expect:
                return False
            try:
                self.envelope.check(keys[i], heads[j], segments[i], self.page_bytes, n)
            except EnvelopeError:
                self._count("corrupt")
                return False
            return True

        ok = [False] * len(keys)
        assert self.client is not None  # registered
        for (i, _), passed in zip(todo, self.client.batch_read(ops, check) if ops else []):
            ok[i] = passed
        good = sum(ok)
        self._count("get_pages", good)
        self._count("get_misses", len(keys) - good)
        self._count("bytes_read", good * self.page_bytes)
        return ok

    # --- v1 ----------------------------------------------------------------------------------------------------------
    def batch_set_v1(self, keys, host_indices) -> list[bool]:
        return self._write_pages(list(keys), self.mem_pool_host.page_memoryviews(host_indices)) if keys else []

    def batch_get_v1(self, keys, host_indices) -> list[bool]:
        return self._read_pages(list(keys), self.mem_pool_host.page_memoryviews(host_indices)) if keys else []

    def batch_exists(self, keys) -> int:
        if not keys:
            return 0
        found = self._meta_call(self.meta.exists, self.rank_id, list(keys))
        if found is _FAILED:
            return 0
        for i, f in enumerate(found):
            if not f:
                return i
        return len(keys)

    # --- v0 ----------------------------------------------------------------------------------------------------------
    def exists(self, key) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key, target_location=None):
        n = self.page_bytes
        out = (
            target_location
            if target_location is not None and target_location.numel() * target_location.element_size() == n
            else torch.empty(n // self.mem_pool_host.spec.itemsize, dtype=self.mem_pool_host.dtype)
        )
        ok = self._read_pages([key], [[memoryview(out.view(-1).view(torch.uint8).numpy())]])
        return out if ok[0] else None

    def set(self, key, value) -> bool:
        return self._write_pages([key], [[memoryview(value.contiguous().view(-1).view(torch.uint8).numpy())]])[0]

    # --- housekeeping ------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        self._meta_call(self.meta.clear, self.rank_id)

    def describe(self) -> str:
        meta = self.cfg.metadata_server_url or "in-process metadata"
        return f"file {self.path} ({self.io_kind} io, {meta})"

    def get_stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats, io_client=self.client.name if self.client else None)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.meta.close()

    def bench_baseline(self):
        return PlainPositionalIO(self)

    # --- certification hooks (hicache certify, the conformance kit) ---------------------------------------------------
    @contextlib.contextmanager
    def failing_writes(self):
        """Inside the block the file's descriptor is read-only: every write fails for real (EBADF)."""
        assert self.client is not None
        good = self.client.fd
        self.client.fd = os.open(self.client.path, os.O_RDONLY)
        try:
            yield
        finally:
            os.close(self.client.fd)
            self.client.fd = good

    def corrupt_stored_page(self, key: str) -> bool:
        """Flip one payload byte in the key's slot, as a bad disk would."""
        slot = self.meta.get_page_indices(self.rank_id, [key])[0]
        if slot is None or self.client is None:
            return False
        pos = slot * self.slot_bytes + HEADER + self.page_bytes - 1
        byte = os.pread(self.client.fd, 1, pos)
        os.pwrite(self.client.fd, bytes([byte[0] ^ 0x40]), pos)
        return True


class PlainPositionalIO:
    """os.pwritev / os.preadv of the same page bytes at the same slot offsets, one thread, no metadata, no header."""

    name = "os.pwritev/preadv at the same offsets"

    def __init__(self, backend: Hf3fsStorage) -> None:
        self.b = backend
        self.path = f"{backend.cfg.file_path_prefix}.bench-baseline.bin"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def set(self, keys, host_indices) -> None:
        for i, segs in enumerate(self.b.mem_pool_host.page_memoryviews(host_indices)):
            os.pwritev(self.fd, segs, (i % self.b.num_slots) * self.b.slot_bytes + HEADER)

    def get(self, keys, host_indices) -> None:
        for i, segs in enumerate(self.b.mem_pool_host.page_memoryviews(host_indices)):
            os.preadv(self.fd, segs, (i % self.b.num_slots) * self.b.slot_bytes + HEADER)

    def cleanup(self) -> None:
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)
