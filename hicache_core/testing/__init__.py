"""The conformance kit: what every storage backend runs against itself to prove it keeps the contract.

Subclass :class:`BackendConformance` in your plugin's tests (name the subclass ``Test...``) and say how to build
your backend::

    from hicache_core.testing import BackendConformance

    class TestMyStore(BackendConformance):
        backend_name = "mystore"                 # the registered name, or override make_backend()

        def extra_config(self, tmp_path):
            return {"root": str(tmp_path)}

        @contextlib.contextmanager
        def failing_writes(self, backend):       # make the next writes fail for real (full disk, dead server...)
            ...

It covers v1 and v0 round trips in every host layout (a backend whose record says it serves only page-first layouts
is refused ``layer_first`` by the core, and those cases are skipped with that reason), ``batch_exists`` prefix
counting, misses, overwrite, failed writes never
becoming visible, namespace isolation and sharing between instances, concurrent threads, clear and stats, and the
L3 codec (round trip through blob methods, or refused without them).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.keys import hash_chain
from hicache_core.memory import HostPool, KVSpec
from hicache_core.registry import check_layout, make_storage_config, open_backend, resolve, resolve_config
from hicache_core.storage.base import StorageConfig
from hicache_core.storage.hooks import FailingWrites
from hicache_core.testing.codec import codec_round_trip

LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def random_keys(n: int, page_size: int = 4) -> list[str]:
    tokens = torch.randint(0, 2**31, (n * page_size,)).tolist()
    return hash_chain(tokens, page_size, prior_hash=os.urandom(32).hex())


def fill_random(pool: HostPool, indices: torch.Tensor) -> None:
    """Random bytes into the given host pages (every segment of each page)."""
    for segs in pool.page_memoryviews(indices):
        for seg in segs:
            seg[:] = os.urandom(len(seg))


def page_bytes(pool: HostPool, indices: torch.Tensor) -> list[bytes]:
    return [b"".join(bytes(s) for s in segs) for segs in pool.page_memoryviews(indices)]


class BackendConformance:
    """Base class of the conformance suite. Override :meth:`make_backend` or set ``backend_name``."""

    backend_name: Optional[str] = None
    page_size: int = 4
    spec = KVSpec(layer_num=3, head_num=2, head_dim=8, dtype=torch.bfloat16)
    pages: int = 6
    supports_v0: bool = True
    supports_clear: bool = True  # the seed's minimal backend (get/set/exists) has no way to delete
    threads: int = 4

    # --- what a backend's test class provides ----------------------------------------------------------------------
    def extra_config(self, tmp_path) -> dict[str, Any]:
        """The extra config that points the backend at its storage (a directory, a server...)."""
        return {}

    def make_backend(self, storage_config: StorageConfig, extra: dict[str, Any]) -> Any:
        """Construct the raw backend class (not yet registered with a host pool)."""
        assert self.backend_name, "set backend_name or override make_backend()"
        return resolve(self.backend_name, extra).cls(storage_config, extra)

    @contextlib.contextmanager
    def failing_writes(self, backend: Any) -> Iterator[None]:
        """Make writes inside the block fail for real (fill the disk, stop the server, ...). By default the
        backend's own certification hook ``failing_writes()`` (docs/writing-a-backend.md); override it when
        failing needs more than the backend (stopping a server)."""
        if not isinstance(backend, FailingWrites):
            pytest.skip(
                f"{type(backend).__name__} offers no failing_writes() hook and {type(self).__name__} does "
                "not override failing_writes(): failed writes cannot be provoked"
            )
        with backend.failing_writes():
            yield

    # --- helpers -------------------------------------------------------------------------------------------------
    def config(self, layout: str, **changes: Any) -> HiCacheConfig:
        return HiCacheConfig(page_size=self.page_size, hicache_mem_layout=layout, model_name="conformance", **changes)

    def _page_first_only(self, tmp_path) -> bool:
        if self.backend_name is None:
            return False
        return resolve(self.backend_name, self.extra_config(tmp_path)).page_first_only

    def build(
        self,
        tmp_path,
        layout: str,
        *,
        spec: Optional[KVSpec] = None,
        model: str = "conformance",
        tp_rank: int = 0,
        pool_pages: Optional[int] = None,
    ) -> tuple[Any, HostPool]:
        if self.backend_name is not None:
            check_layout(resolve(self.backend_name, self.extra_config(tmp_path)), layout)
        spec = spec or self.spec
        pool = HostPool(spec, (pool_pages or 4 * self.pages) * self.page_size, self.page_size, layout, pin_memory=False)
        cfg = self.config(layout).replace(model_name=model)
        sc = make_storage_config(cfg, spec, tp_rank=tp_rank, tp_size=max(2, tp_rank + 1) if tp_rank else 1)
        extra = self.extra_config(tmp_path)
        sc = StorageConfig(**{**_asdict(sc), "extra_config": extra})
        backend = self.make_backend(sc, extra)
        backend.register_mem_pool_host(pool)
        self._opened.append(backend)
        return backend, pool

    @pytest.fixture(autouse=True)
    def _close_backends(self):
        self._opened: list[Any] = []
        yield
        for b in self._opened:
            with contextlib.suppress(Exception):
                b.close()

    def _require_layout(self, tmp_path, layout: str) -> None:
        if layout == "layer_first" and self._page_first_only(tmp_path):
            pytest.skip(f"{self.backend_name} serves page-first layouts only (test_unserved_layout_is_refused)")

    def _require_v0(self) -> None:
        if not self.supports_v0:
            pytest.skip(f"{type(self).__name__} is v1 only (supports_v0 = False)")

    @pytest.fixture(params=LAYOUTS)
    def layout(self, request) -> str:
        return request.param

    # --- the suite -----------------------------------------------------------------------------------------------
    def test_unserved_layout_is_refused(self, tmp_path):
        """A backend registered as page-first only is refused layer_first by the core, with the fix."""
        if not self._page_first_only(tmp_path):
            pytest.skip("the backend serves every host layout")
        with pytest.raises(ConfigError, match="page_first_direct"):
            self.build(tmp_path, "layer_first")

    def test_v1_roundtrip(self, tmp_path, layout):
        self._require_layout(tmp_path, layout)
        backend, pool = self.build(tmp_path, layout)
        n, ps = self.pages, self.page_size
        src, dst = pool.alloc(n * ps), pool.alloc(n * ps)
        fill_random(pool, src)
        keys = random_keys(n, ps)
        assert list(backend.batch_set_v1(keys, src)) == [True] * n
        assert backend.batch_exists(keys) == n
        assert list(backend.batch_get_v1(keys, dst)) == [True] * n
        assert page_bytes(pool, dst) == page_bytes(pool, src)

    def test_v1_single_page_and_scattered_indices(self, tmp_path, layout):
        self._require_layout(tmp_path, layout)
        backend, pool = self.build(tmp_path, layout)
        ps = self.page_size
        everything = pool.alloc(pool.size)
        pages = everything.view(-1, ps)
        src = pages[[5, 1, 9]].reshape(-1)  # not in order, not adjacent
        dst = pages[[2, 11, 0]].reshape(-1)
        fill_random(pool, src)
        keys = random_keys(3, ps)
        assert list(backend.batch_set_v1(keys[:1], src[:ps])) == [True]
        assert list(backend.batch_set_v1(keys[1:], src[ps:])) == [True, True]
        assert list(backend.batch_get_v1(keys, dst)) == [True] * 3
        assert page_bytes(pool, dst) == page_bytes(pool, src)

    def test_v0_roundtrip(self, tmp_path, layout):
        self._require_v0()
        self._require_layout(tmp_path, layout)
        backend, pool = self.build(tmp_path, layout)
        ps = self.page_size
        src = pool.alloc(3 * ps)
        fill_random(pool, src)
        keys = random_keys(3, ps)
        pages = [pool.get_flat_page(int(src[i * ps])) for i in range(3)]
        assert backend.set(keys[0], pages[0]) is True
        assert backend.exists(keys[0])
        got = backend.get(keys[0])
        assert got is not None and _raw(got) == _raw(pages[0])
        target = pool.dummy_flat_page()
        got = backend.get(keys[0], target)
        assert got is not None and _raw(got) == _raw(pages[0])
        assert bool(backend.batch_set(keys[1:], pages[1:])) is True
        out = backend.batch_get(keys, [pool.dummy_flat_page() for _ in keys])
        assert [_raw(o) for o in out] == [_raw(p) for p in pages]
        # v0 and v1 see the same bytes
        dst = pool.alloc(3 * ps)
        if getattr(self, "supports_v1", True):
            assert list(backend.batch_get_v1(keys, dst)) == [True] * 3
            assert page_bytes(pool, dst) == page_bytes(pool, src)

    def test_batch_exists_counts_prefix(self, tmp_path):
        backend, pool = self.build(tmp_path, "page_first_direct")
        ps = self.page_size
        src = pool.alloc(4 * ps)
        fill_random(pool, src)
        keys = random_keys(6, ps)
        assert backend.batch_exists([]) == 0
        assert backend.batch_exists(keys) == 0
        backend.batch_set_v1(keys[:3], src[: 3 * ps])
        backend.batch_set_v1(keys[4:5], src[3 * ps :])
        assert backend.batch_exists(keys) == 3  # stops at the first gap even though keys[4] exists
        assert backend.batch_exists(keys[4:5]) == 1
        assert backend.batch_exists(keys[3:]) == 0

    def test_miss(self, tmp_path):
        backend, pool = self.build(tmp_path, "page_first_direct")
        ps = self.page_size
        dst = pool.alloc(2 * ps)
        keys = random_keys(2, ps)
        assert list(backend.batch_get_v1(keys, dst)) == [False, False]

    def test_v0_miss(self, tmp_path):
        self._require_v0()
        backend, pool = self.build(tmp_path, "page_first_direct")
        keys = random_keys(2, self.page_size)
        assert not backend.exists(keys[0])
        assert backend.get(keys[0], pool.dummy_flat_page()) is None

    def test_overwrite_keeps_one_whole_page(self, tmp_path):
        backend, pool = self.build(tmp_path, "page_first_direct")
        ps = self.page_size
        a, b, dst = pool.alloc(ps), pool.alloc(ps), pool.alloc(ps)
        fill_random(pool, a)
        fill_random(pool, b)
        key = random_keys(1, ps)
        assert list(backend.batch_set_v1(key, a)) == [True]
        assert list(backend.batch_set_v1(key, b)) == [True]
        assert list(backend.batch_get_v1(key, dst)) == [True]
        assert page_bytes(pool, dst)[0] in (page_bytes(pool, a)[0], page_bytes(pool, b)[0])

    def test_failed_write_is_not_visible(self, tmp_path):
        backend, pool = self.build(tmp_path, "page_first_direct")
        ps = self.page_size
        src, dst = pool.alloc(2 * ps), pool.alloc(2 * ps)
        fill_random(pool, src)
        keys = random_keys(2, ps)
        with self.failing_writes(backend):
            try:
                results = list(backend.batch_set_v1(keys, src))
            except Exception:  # raising is allowed too: the controller counts it as a failed write
                results = [False, False]
        assert results == [False, False]
        assert backend.batch_exists(keys) == 0
        assert list(backend.batch_get_v1(keys, dst)) == [False, False]
        # and the backend still works afterwards
        assert list(backend.batch_set_v1(keys, src)) == [True, True]
        assert backend.batch_exists(keys) == 2

    def test_namespace_isolation_and_sharing(self, tmp_path):
        ps = self.page_size
        writer, wpool = self.build(tmp_path, "page_first_direct")
        src = wpool.alloc(2 * ps)
        fill_random(wpool, src)
        keys = random_keys(2, ps)
        assert list(writer.batch_set_v1(keys, src)) == [True, True]
        # same namespace, another instance on the same storage: sees the pages
        same, spool = self.build(tmp_path, "page_first_direct")
        dst = spool.alloc(2 * ps)
        assert same.batch_exists(keys) == 2
        assert list(same.batch_get_v1(keys, dst)) == [True, True]
        assert page_bytes(spool, dst) == page_bytes(wpool, src)
        # anything that changes page bytes: another model, dtype, page order, or tp rank -> nothing visible
        others = [
            self.build(tmp_path, "page_first_direct", model="another-model"),
            self.build(
                tmp_path, "page_first_direct", spec=KVSpec(layer_num=3, head_num=2, head_dim=8, dtype=torch.float16)
            ),
            self.build(
                tmp_path,
                "page_first",
            ),
            self.build(tmp_path, "page_first_direct", tp_rank=1),
        ]
        for other, opool in others:
            assert other.batch_exists(keys) == 0
            assert list(other.batch_get_v1(keys, opool.alloc(2 * ps))) == [False, False]

    def test_concurrent_threads(self, tmp_path):
        backend, pool = self.build(tmp_path, "page_first_direct", pool_pages=self.threads * 8 + 8)
        ps = self.page_size
        shared_keys = random_keys(2, ps)
        shared_src = pool.alloc(2 * ps)
        fill_random(pool, shared_src)
        expected_shared = page_bytes(pool, shared_src)
        jobs = []
        for _ in range(self.threads):
            src, dst, sdst = pool.alloc(3 * ps), pool.alloc(3 * ps), pool.alloc(2 * ps)
            fill_random(pool, src)
            jobs.append((random_keys(3, ps), src, dst, sdst))
        errors: list[str] = []

        def work(keys, src, dst, sdst):
            try:
                for i in range(3):
                    r = list(backend.batch_set_v1(keys, src))
                    assert r == [True] * 3, f"round {i}: set of own pages answered {r}"
                    r = list(backend.batch_set_v1(shared_keys, shared_src))
                    assert r == [True, True], f"round {i}: set of the shared pages answered {r}"
                    r = list(backend.batch_get_v1(keys, dst))
                    assert r == [True] * 3, f"round {i}: get of own pages answered {r}"
                    assert page_bytes(pool, dst) == page_bytes(pool, src), f"round {i}: own pages read WRONG BYTES"
                    r = list(backend.batch_get_v1(shared_keys, sdst))
                    assert r == [True, True], f"round {i}: get of the shared pages answered {r}"
                    assert page_bytes(pool, sdst) == expected_shared, f"round {i}: shared pages read WRONG BYTES"
            except Exception as e:  # pragma: no cover - reported below
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=work, args=j) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert errors == [], f"{len(errors)} threads failed: {errors[:3]}"

    def test_clear(self, tmp_path):
        if not self.supports_clear:
            pytest.skip(f"{type(self).__name__} cannot delete pages (supports_clear = False)")
        backend, pool = self.build(tmp_path, "page_first_direct")
        ps = self.page_size
        src = pool.alloc(2 * ps)
        fill_random(pool, src)
        keys = random_keys(2, ps)
        backend.batch_set_v1(keys, src)
        assert backend.batch_exists(keys) == 2
        backend.clear()
        assert backend.batch_exists(keys) == 0
        assert list(backend.batch_set_v1(keys, src)) == [True, True]

    def test_stats(self, tmp_path):
        backend, pool = self.build(tmp_path, "page_first_direct")
        ps = self.page_size
        before = backend.get_stats()
        assert before is None or isinstance(before, dict)
        src, dst = pool.alloc(2 * ps), pool.alloc(2 * ps)
        fill_random(pool, src)
        keys = random_keys(2, ps)
        backend.batch_set_v1(keys, src)
        backend.batch_get_v1(keys, dst)
        after = backend.get_stats()
        assert isinstance(after, dict) and after, "get_stats() should report counters"
        assert after != before

    def test_through_registry(self, tmp_path):
        """Built the way the cache builds it (resolve_config + open_backend), the backend round-trips pages."""
        if not self.backend_name:
            pytest.skip("no backend_name: the backend is not registered under a name")
        cfg = self.config(
            "page_first_direct",
            hicache_io_backend="direct",
            hicache_storage_backend=self.backend_name,
            hicache_storage_backend_extra_config=self.extra_config(tmp_path),
        )
        cfg, resolved = resolve_config(cfg)
        handle, pool = open_backend(cfg, self.spec, 4 * self.pages * self.page_size, resolved=resolved)
        self._opened.append(handle)
        ps = self.page_size
        src, dst = pool.alloc(2 * ps), pool.alloc(2 * ps)
        fill_random(pool, src)
        keys = random_keys(2, ps)
        assert list(handle.batch_set_v1(keys, src)) == [True, True]
        assert handle.batch_exists(keys) == 2
        assert list(handle.batch_get_v1(keys, dst)) == [True, True]
        assert page_bytes(pool, dst) == page_bytes(pool, src)

    def test_codec_through_registry(self, tmp_path):
        """The L3 codec (zstd): pages round-trip byte-exact through the backend's blob methods, or -- for a backend
        without them -- the core refuses the codec at start, naming the backend."""
        codec_round_trip(self, tmp_path)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _asdict(sc: StorageConfig) -> dict:
    import attrs

    return {f.name: getattr(sc, f.name) for f in attrs.fields(type(sc))}
