"""Mooncake Store backend: the host pool's buffer is registered once, then pages move by pointer.

Keys: ``[{extra_backend_tag}_]{namespace tag}_{page hash}_k`` (and ``_v`` for MHA: K and V halves of a page are each
contiguous in page-first layouts). The namespace tag carries model, dtype, page size, heads, dims and -- where KV is
sharded (MHA) -- the tp rank, so deployments never read each other's pages.

A page counts as stored or read only when every part of it is; a read whose byte count is not the part's size is
a miss. The master refuses a put of an existing key before any byte moves, so no existence query precedes a put.
That refusal also answers a put of a key another writer is still putting, and the client counts it as stored:
so a read that finds a page not ready yet (-703) asks again for up to ``not_ready_wait_s`` before it is a miss.
While the master is down every call fails fast as a miss; the client re-mounts its segment once the master is back,
and if calls keep failing past ``reconnect_after_s`` the plugin rebuilds the client.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

from hicache_core.errors import BackendLoadError
from hicache_core.storage import HiCacheStorage
from hicache_plugin_mooncake.blobs import get_blobs, put_blobs
from hicache_plugin_mooncake.config import MooncakeStoreConfig
from hicache_plugin_mooncake.probe import check_reachable

logger = logging.getLogger(__name__)

STATS = (
    "get_pages get_misses short_reads set_pages set_failed errors reconnects not_ready_retries bytes_read bytes_written"
).split()
V1_ONLY = "the mooncake backend is zero-copy only (v1): it moves pages of the registered host pool"
NOT_READY = -703  # the key exists but its put has not finished (another writer is still moving its bytes)


def _import_store():
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise BackendLoadError(
            f"mooncake backend: cannot import mooncake.store ({e}); pip install 'hicache-plugin-mooncake[cuda]' "
            "(or [cpu] on a machine without a GPU); the CPU build also needs Debian's libibverbs1"
        ) from e
    return MooncakeDistributedStore


class MooncakeStore(HiCacheStorage):
    """Extra config: ``master_server_address`` (host:port) and the other MooncakeStoreConfig fields, or none of
    them to use ``$SGLANG_HICACHE_MOONCAKE_CONFIG_PATH`` / ``MOONCAKE_*``; plus ``connect_timeout_s`` (30) and
    ``reconnect_after_s`` (10)."""

    supports_v0 = False  # zero copy only: pages move between registered buffers (the conformance kit reads this)

    def __init__(self, storage_config, extra_config=None) -> None:
        super().__init__(storage_config, extra_config)
        self.cfg = MooncakeStoreConfig.load(self.extra_config)
        self.connect_timeout_s, self.reconnect_after_s = self.cfg.connect_timeout_s, self.cfg.reconnect_after_s
        tag = self.cfg.extra_backend_tag
        self.prefix = (f"{tag}_" if tag else "") + self.namespace.tag + "_"
        # with the L3 codec a page is one object of its encoded length, with "head_group" one object per head
        # group (blobs.py): either way one object per key the core gives
        self.blobs = getattr(storage_config, "codec", ("none",))[0] != "none" or bool(
            getattr(storage_config, "head_group", 0)
        )
        self.parts: tuple[str, ...] = (
            ("_z",) if self.blobs else ("_k",) if storage_config.is_mla_model else ("_k", "_v")
        )
        self.tp_size = max(1, storage_config.tp_size)
        self._lock = threading.Lock()
        self._reconnecting = threading.Event()
        self._users: dict[int, int] = {}  # id(client) -> calls inside it now
        self._retired: dict[int, Any] = {}  # replaced clients, closed once no call is inside them
        self._stats = dict.fromkeys(STATS, 0)
        self._failing_since: Optional[float] = None
        self._registered: list[tuple[int, int]] = []
        self.store = self._connect()
        self.replicate = _replicate_config(self.cfg)  # every put's; replica_num 1 is Mooncake's default

    # --- connection --------------------------------------------------------------------------------------------------
    def _connect(self):
        cls = _import_store()
        check_reachable(self.cfg, self.connect_timeout_s)
        store = cls()
        c = self.cfg
        args = (
            c.local_hostname,
            c.metadata_server,
            c.global_segment_size // self.tp_size,
            c.local_buffer_size // self.tp_size,
            c.protocol,
            c.device_name,
            c.master_server_address,
        )
        result: dict[str, Any] = {}

        def setup() -> None:  # a daemon thread: a master that never answers must not hang the process at exit
            try:
                result["rc"] = store.setup(*args)
            except Exception as e:
                result["error"] = e

        t = threading.Thread(target=setup, name="mooncake-setup", daemon=True)
        t.start()
        t.join(self.connect_timeout_s)
        if t.is_alive():
            raise BackendLoadError(
                f"mooncake backend: no answer from mooncake_master at {c.master_server_address} (metadata "
                f"{c.metadata_server}) within {self.connect_timeout_s:.0f} s (config from {c.source}); is it running?"
            )
        if "error" in result:
            e = result["error"]
            raise BackendLoadError(f"mooncake backend: setup failed: {type(e).__name__}: {e}") from e
        rc = result["rc"]
        if rc != 0:
            raise BackendLoadError(
                f"mooncake backend: setup with mooncake_master at {c.master_server_address} (metadata "
                f"{c.metadata_server}, protocol {c.protocol}) failed with code {rc}; check that the master runs "
                f"and the metadata server answers (config from {c.source})"
            )
        for buf in self._registered:
            store.register_buffer(*buf)
        return store

    def _reconnect(self) -> None:
        """Build a new client and swap it in, on a thread of its own (:meth:`_health` starts it): no call waits for
        the master's connect. The old one is closed once no call is inside it (:meth:`_client`)."""
        logger.warning("mooncake backend: calls failing for %.0f s: rebuilding the client", self.reconnect_after_s)
        try:
            try:
                new = self._connect()
            except Exception as e:
                logger.warning("mooncake backend: reconnect failed: %s", e)
                self._failing_since = time.monotonic()  # try again after another interval
                return
            with self._lock:
                old, self.store = self.store, new
                self._retired[id(old)] = old
                idle = not self._users.get(id(old))
            self._count("reconnects")
            self._failing_since = None
            if idle:
                self._close_retired(id(old))
        finally:
            self._reconnecting.clear()

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        """The client for one call; a client replaced under calls is closed when the last leaves (closing it under
        them crashed the process)."""
        with self._lock:
            client = self.store
            self._users[id(client)] = self._users.get(id(client), 0) + 1
        try:
            yield client
        finally:
            with self._lock:
                left = self._users[id(client)] - 1
                if left:
                    self._users[id(client)] = left
                else:
                    del self._users[id(client)]
                last_out = not left and id(client) in self._retired
            if last_out:
                self._close_retired(id(client))

    def _close_retired(self, key: int) -> None:
        with self._lock:
            old = self._retired.pop(key, None)
        if old is not None:  # on a daemon thread: with its master gone, a close may never return
            threading.Thread(target=_close_quietly, args=(old,), name="mooncake-close-old", daemon=True).start()

    def _health(self, ok: bool) -> None:
        if ok:
            self._failing_since = None
            return
        self._count("errors")
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since > self.reconnect_after_s and not self._reconnecting.is_set():
            with self._lock:
                if self._reconnecting.is_set():
                    return
                self._reconnecting.set()
            threading.Thread(target=self._reconnect, name="mooncake-reconnect", daemon=True).start()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    # --- registration ------------------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Page-first layouts only (zero copy of whole K/V halves): declared by the plugin's record
        (``page_first_only``) and enforced by the core before this is called."""
        super().register_mem_pool_host(mem_pool_host)
        # a pool whose page spans several buffers (SGLang's asymmetric K/V, a Mamba state) names them all
        self._registered = list(getattr(mem_pool_host, "buffers", None) or [])
        if not self._registered:
            self._registered = [(mem_pool_host.raw.data_ptr(), mem_pool_host.raw.numel())]
        n = int(getattr(mem_pool_host, "segments_per_page", len(self.parts)))
        if (
            n != len(self.parts) and not self.blobs
        ):  # one object per segment of a page: _k (_v) as before, else _s0, _s1, ...
            self.parts = tuple(f"_s{i}" for i in range(n))
        for buf in self._registered:
            rc = self.store.register_buffer(*buf)
            if rc != 0:
                raise BackendLoadError(f"mooncake backend: registering the host pool buffer failed with code {rc}")

    # --- keys --------------------------------------------------------------------------------------------------------
    def _keys(self, keys: list[str]) -> list[str]:
        return [f"{self.prefix}{k}{p}" for k in keys for p in self.parts]

    def _meta(self, host_indices) -> tuple[list[int], list[int]]:
        return self.mem_pool_host.get_page_buffer_meta(host_indices)

    # --- v1 ----------------------------------------------------------------------------------------------------------
    def batch_set_v1(self, keys, host_indices) -> list[bool]:
        if not keys:
            return []
        ptrs, sizes = self._meta(host_indices)
        try:
            with self._client() as store:
                rc = store.batch_put_from(self._keys(keys), ptrs, sizes, self.replicate)
        except Exception as e:
            logger.warning("mooncake backend: batch_put_from raised %s", e)
            rc = [-1] * len(ptrs)
        n = len(self.parts)
        if len(rc) == len(ptrs) and not any(rc):  # every part stored
            ok = [True] * len(keys)
        else:
            ok = [all(r == 0 for r in rc[i * n : (i + 1) * n]) for i in range(len(keys))]
        if any(ok):  # a refused put (a full store) proves nothing about the master
            self._health(True)
        good = sum(ok)
        self._count("set_pages", good)
        self._count("set_failed", len(keys) - good)
        self._count("bytes_written", good * self.mem_pool_host.page_bytes)
        return ok

    def batch_get_v1(self, keys, host_indices) -> list[bool]:
        if not keys:
            return []
        ptrs, sizes = self._meta(host_indices)
        rc = self._get_into(self._keys(keys), ptrs, sizes)
        n = len(self.parts)
        if rc == sizes:  # every part whole: one C-level comparison
            self._health(True)
            with self._lock:
                self._stats["get_pages"] += len(keys)
                self._stats["bytes_read"] += len(keys) * self.mem_pool_host.page_bytes
            return [True] * len(keys)
        out = []
        for i in range(len(keys)):
            got = rc[i * n : (i + 1) * n]
            want = sizes[i * n : (i + 1) * n]
            if all(g == w for g, w in zip(got, want)):
                out.append(True)
            else:
                if any(g > 0 and g != w for g, w in zip(got, want)):
                    self._count("short_reads")
                out.append(False)
        self._health(any(out) or all(r in (-704,) for r in rc))  # -704: not found is an answer, not a failure
        good = sum(out)
        self._count("get_pages", good)
        self._count("get_misses", len(keys) - good)
        self._count("bytes_read", good * self.mem_pool_host.page_bytes)
        return out

    def _get_into(self, parts: list[str], ptrs: list[int], sizes: list[int]) -> list[int]:
        """batch_get_into, asking again for the parts another writer is still putting (bounded wait)."""
        try:
            with self._client() as store:
                rc = list(store.batch_get_into(parts, ptrs, sizes))
        except Exception as e:
            logger.warning("mooncake backend: batch_get_into raised %s", e)
            return [-1] * len(ptrs)
        deadline = time.monotonic() + self.cfg.not_ready_wait_s
        pause = 0.002
        while True:
            waiting = [i for i, r in enumerate(rc) if r == NOT_READY]
            if not waiting or time.monotonic() >= deadline:
                return rc
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            self._count("not_ready_retries")
            try:
                with self._client() as store:
                    again = store.batch_get_into(
                        [parts[i] for i in waiting], [ptrs[i] for i in waiting], [sizes[i] for i in waiting]
                    )
            except Exception as e:
                logger.warning("mooncake backend: batch_get_into raised %s", e)
                return rc
            for i, r in zip(waiting, again):
                rc[i] = r

    def batch_exists(self, keys) -> int:
        if not keys:
            return 0
        try:
            with self._client() as store:
                rc = store.batch_is_exist(self._keys(keys))
        except Exception as e:
            logger.warning("mooncake backend: batch_is_exist raised %s", e)
            rc = [-1]
        self._health(all(r >= 0 for r in rc))
        n = len(self.parts)
        for i in range(len(keys)):
            part = rc[i * n : (i + 1) * n]
            if len(part) < n or any(r != 1 for r in part):
                return i
        return len(keys)

    # --- v0 (through the host pool: Mooncake moves bytes between registered buffers only) -----------------------------
    def exists(self, key) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key, target_location=None):
        raise NotImplementedError(V1_ONLY)

    def set(self, key, value) -> bool:
        raise NotImplementedError(V1_ONLY)

    # --- blobs (the L3 codec's values) -------------------------------------------------------------------------------
    def batch_set_blobs(self, keys, blobs) -> list[bool]:
        return put_blobs(self, self._keys(keys), blobs)

    def batch_get_blobs(self, keys, max_bytes) -> list:
        return get_blobs(self, self._keys(keys), max_bytes)

    # --- housekeeping ------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Remove this namespace's pages (other deployments on the same master keep theirs)."""
        if hasattr(self.store, "remove_by_regex"):
            self.store.remove_by_regex("^" + re.escape(self.prefix), True)
        else:  # pragma: no cover - older clients
            logger.warning("mooncake backend: this client has no remove_by_regex: clear() removes every key")
            self.store.remove_all()

    def describe(self) -> str:
        return f"Mooncake Store, master {self.cfg.master_server_address} ({self.cfg.protocol}), keys {self.prefix}*"

    def get_stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        try:
            self.store.close()
        except Exception as e:  # pragma: no cover
            logger.warning("mooncake backend: close failed: %s", e)

    def bench_baseline(self):
        from hicache_plugin_mooncake.baseline import RawMooncakeLoop

        return RawMooncakeLoop(self)


def _replicate_config(cfg: MooncakeStoreConfig) -> Any:
    from mooncake.store import ReplicateConfig

    rc = ReplicateConfig()
    rc.replica_num = cfg.replica_num
    return rc


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:
        pass
