"""The seed's minimal custom backend: a class with get(key), exists(key), set(key, value) and nothing else -- no
base class, no batch methods, no register_mem_pool_host, no constructor arguments -- loads by `dynamic` JSON and
by entry point, passes the conformance kit's v0 tests and runs the multi-turn benchmark."""

import contextlib
import json
import textwrap
from pathlib import Path

import pytest
import torch

from hicache_core.bench import multiturn
from hicache_core.config import HiCacheConfig
from hicache_core.memory import HostPool, KVSpec
from hicache_core.registry import create_backend, make_storage_config, resolve
from hicache_core.storage.adapter import as_v1
from hicache_core.testing import BackendConformance, fill_random, page_bytes, random_keys

from core_helpers import install_plugin

SEED_STORE = '''
class SeedStore:
    """Exactly what the seed document asks of a custom backend."""

    pages = {}

    def get(self, key):
        return self.pages.get(key)

    def exists(self, key):
        return key in self.pages

    def set(self, key, value):
        self.pages[key] = value
        return True
'''
DYNAMIC = {"backend_name": "seed", "module_path": "seed_store", "class_name": "SeedStore", "interface_v1": 0}


@pytest.fixture()
def seed_module(tmp_path, monkeypatch):
    (tmp_path / "seed_store.py").write_text(textwrap.dedent(SEED_STORE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import seed_store

    seed_store.SeedStore.pages.clear()
    yield seed_store
    seed_store.SeedStore.pages.clear()


class TestSeedConformance(BackendConformance):
    """The kit against the class as the core wraps it (V0Adapter + namespace prefix): v0 and v1 through it.
    Stats come from the adapter's counters; clear() has nothing to call (the seed class cannot delete)."""

    supports_clear = False

    @pytest.fixture(autouse=True)
    def _module(self, seed_module):
        self.cls = seed_module.SeedStore

    def make_backend(self, storage_config, extra):
        return as_v1(self.cls(), interface_v1=False, namespace=storage_config.namespace)

    @contextlib.contextmanager
    def failing_writes(self, backend):
        store = backend.inner.inner  # NamespacedBackend -> V0Adapter -> SeedStore
        store.set = lambda key, value: False  # the store refuses: a full dict, say
        try:
            yield
        finally:
            del store.set


def _roundtrip(handle, pool):
    src, dst = pool.alloc(2 * 4), pool.alloc(2 * 4)
    fill_random(pool, src)
    keys = random_keys(2, 4)
    assert handle.batch_set_v1(keys, src) == [True, True] and handle.batch_exists(keys) == 2
    assert handle.batch_get_v1(keys, dst) == [True, True]
    assert page_bytes(pool, dst) == page_bytes(pool, src)


SPEC = KVSpec(layer_num=2, head_num=2, head_dim=4, dtype=torch.float16)


def test_loads_by_dynamic_json(seed_module):
    cfg = HiCacheConfig(page_size=4, hicache_storage_backend="dynamic", hicache_storage_backend_extra_config=DYNAMIC)
    pool = HostPool(SPEC, 64, 4, "layer_first", pin_memory=False)
    handle = create_backend("dynamic", make_storage_config(cfg, SPEC), pool)
    assert not handle.interface_v1
    _roundtrip(handle, pool)
    assert all(k.startswith(make_storage_config(cfg, SPEC).namespace.tag) for k in seed_module.SeedStore.pages)


def test_loads_by_entry_point(seed_module, tmp_path, monkeypatch):
    plugin = """
from hicache_core.hookspecs import BackendRecord, hookimpl

@hookimpl
def hicache_storage_backends():
    yield BackendRecord(name="seedling", target="seed_store:SeedStore", interface_v1=False)
"""
    site = install_plugin(tmp_path / "site", "hicache-plugin-seedling", "seedling_pkg", plugin, "seedling")
    monkeypatch.syspath_prepend(str(site))
    from hicache_core.plugins import HiCachePluginManager

    pm = HiCachePluginManager()
    assert resolve("seedling", {}, pm).cls is seed_module.SeedStore
    pool = HostPool(SPEC, 64, 4, "page_first_direct", pin_memory=False)
    _roundtrip(create_backend("seedling", make_storage_config(HiCacheConfig(page_size=4), SPEC), pool, pm=pm), pool)


def test_runs_the_multiturn_benchmark(seed_module, tmp_path):
    from test_engine import SMALL, parse

    args = parse(
        SMALL
        + [
            "--no-warm",
            "--configs",
            "hicache+storage",
            "--report-dir",
            str(tmp_path / "r"),
            "--hicache-ratio",
            "1",
            "--max-running",
            "1",  # host no larger than device, one request at a time: storage serves
            "--hicache-storage-backend",
            "dynamic",
            "--hicache-storage-backend-extra-config",
            json.dumps({**DYNAMIC, "prefetch_threshold": 16}),
        ]
    )
    assert multiturn.run(args) == 0  # tokens identical to no-cache
    report = json.loads(Path(tmp_path / "r" / "report.json").read_text())
    run = {c["config"]: c for c in report["configs"]}["hicache+storage"]
    assert run["backuped_tokens"] > 0 and run["hit_tokens"]["storage"] > 0
