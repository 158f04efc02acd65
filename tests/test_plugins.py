"""Plugin discovery, the registry, dynamic loading and every malformed input's message."""

import subprocess
import sys
import textwrap

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import BackendLoadError, ConfigError
from hicache_core.hookspecs import hookimpl
from hicache_core.memory import HostPool, KVSpec
from hicache_core.plugins import HiCachePluginManager
from hicache_core.registry import create_backend, make_storage_config, resolve
from hicache_core.testing import fill_random, page_bytes, random_keys

from core_helpers import install_plugin, run_cli

SPEC = KVSpec(layer_num=2, head_num=2, head_dim=4, dtype=torch.float16)

VENDOR_PLUGIN = """
from hicache_core.hookspecs import BackendRecord, hookimpl

@hookimpl
def hicache_storage_backends():
    yield BackendRecord(name="vendor", target="vendor_store.store:VendorStore", interface_v1=False,
                        description="a vendor's v0 store")
"""
VENDOR_STORE = """
import torch
from hicache_core.storage import HiCacheStorage

class VendorStore(HiCacheStorage):
    DATA = {}
    def get(self, key, target_location=None):
        v = self.DATA.get(self.namespace.key(key))
        return None if v is None else v.clone()
    def set(self, key, value):
        self.DATA[self.namespace.key(key)] = value.clone()
        return True
    def exists(self, key):
        return self.namespace.key(key) in self.DATA
"""

# A class written the way SGLang's docs describe a dynamic backend: constructor (storage_config, kwargs),
# v0 methods only, no base class from us, nothing about namespaces.
SGLANG_STYLE = """
import torch

class SGLangStyleStore:
    def __init__(self, storage_config, kwargs):
        self.rank = storage_config.tp_rank
        self.kwargs = kwargs
        self.data = {}
    def register_mem_pool_host(self, mem_pool_host):
        self.mem_pool_host = mem_pool_host
    def get(self, key, target_location=None, target_sizes=None):
        v = self.data.get(key)
        if v is None:
            return None
        if target_location is not None:
            target_location.copy_(v)
            return target_location
        return v
    def batch_get(self, keys, target_locations=None, target_sizes=None):
        return [self.get(k, t) for k, t in zip(keys, target_locations or [None] * len(keys))]
    def set(self, key, value=None, target_location=None, target_sizes=None):
        self.data[key] = value.clone()
        return True
    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        return all(self.set(k, v) for k, v in zip(keys, values))
    def exists(self, key):
        return key in self.data
"""


def roundtrip(handle, pool, n=3):
    ps = pool.page_size
    src, dst = pool.alloc(n * ps), pool.alloc(n * ps)
    fill_random(pool, src)
    keys = random_keys(n, ps)
    assert list(handle.batch_set_v1(keys, src)) == [True] * n
    assert handle.batch_exists(keys) == n
    assert list(handle.batch_get_v1(keys, dst)) == [True] * n
    assert page_bytes(pool, dst) == page_bytes(pool, src)
    return keys


def pool_for(layout="layer_first"):
    return HostPool(SPEC, 64, 4, layout, pin_memory=False)


def storage_config(layout="layer_first", extra=None, **kw):
    cfg = HiCacheConfig(page_size=4, hicache_mem_layout=layout, hicache_storage_backend_extra_config=extra or {}, **kw)
    return make_storage_config(cfg, SPEC)


@pytest.fixture
def vendor_site(tmp_path, monkeypatch):
    site = install_plugin(
        tmp_path / "site", "hicache-plugin-vendor", "vendor_store", VENDOR_PLUGIN, "vendor", {"store": VENDOR_STORE}
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_memory_is_builtin():
    table, broken = HiCachePluginManager(load_entry_points=False).offered_backends()
    assert table["memory"][0].distribution == "hicache-core" and not broken


def test_entry_point_plugin_appears_and_works(vendor_site):
    pm = HiCachePluginManager()
    table, _ = pm.offered_backends()
    assert table["vendor"][0].distribution == "hicache-plugin-vendor"
    assert table["vendor"][0].version == "0.3.1"
    pool = pool_for()
    handle = create_backend("vendor", storage_config(), pool, pm=pm)
    assert not handle.interface_v1  # v0 class, served to the controller as v1 through the adapter
    roundtrip(handle, pool)


def test_allow_and_deny_lists(vendor_site, monkeypatch):
    monkeypatch.setenv("HICACHE_PLUGINS_DISABLE", "vendor")
    assert "vendor" not in HiCachePluginManager().offered_backends()[0]
    monkeypatch.delenv("HICACHE_PLUGINS_DISABLE")
    monkeypatch.setenv("HICACHE_PLUGINS", "someone-else")
    assert "vendor" not in HiCachePluginManager().offered_backends()[0]
    monkeypatch.setenv("HICACHE_PLUGINS", "hicache-plugin-vendor")
    assert "vendor" in HiCachePluginManager().offered_backends()[0]


def test_lifecycle_hooks_see_create_and_close():
    seen = []

    class Observer:
        @hookimpl
        def hicache_backend_created(self, name, backend, storage_config):
            seen.append(("created", name, type(backend).__name__))

        @hookimpl
        def hicache_backend_closed(self, name, backend):
            seen.append(("closed", name))

    pm = HiCachePluginManager(load_entry_points=False)
    pm.register(Observer())
    handle = create_backend("memory", storage_config(), pool_for(), pm=pm)
    handle.close()
    handle.close()  # idempotent
    assert seen == [("created", "memory", "MemoryStorage"), ("closed", "memory")]


def test_duplicate_name_names_both_distributions(tmp_path, monkeypatch):
    a = install_plugin(tmp_path / "a", "hicache-plugin-one", "one_pkg", VENDOR_PLUGIN, "one", {"store": VENDOR_STORE})
    b = install_plugin(tmp_path / "b", "hicache-plugin-two", "two_pkg", VENDOR_PLUGIN, "two", {"store": VENDOR_STORE})
    monkeypatch.syspath_prepend(str(a))
    monkeypatch.syspath_prepend(str(b))
    with pytest.raises(
        BackendLoadError, match=r"'vendor' is claimed by hicache-plugin-(one|two) .* and hicache-plugin-(one|two)"
    ):
        resolve("vendor", {}, HiCachePluginManager())


def test_plugin_that_raises_on_import_fails_only_when_selected(tmp_path, monkeypatch, caplog):
    site = install_plugin(
        tmp_path / "s",
        "hicache-plugin-broken",
        "broken_pkg",
        "raise ImportError('libfoo.so: cannot open shared object file')\n",
        "broken",
    )
    monkeypatch.syspath_prepend(str(site))
    pm = HiCachePluginManager()
    assert "failed to load" in caplog.text and "libfoo.so" in caplog.text
    assert "memory" in pm.offered_backends()[0]  # the rest still works
    with pytest.raises(
        BackendLoadError,
        match=r"plugin hicache-plugin-broken failed to load \(ImportError: libfoo.so.*"
        r"pip install --force-reinstall hicache-plugin-broken",
    ):
        resolve("broken", {}, pm)


MISSPELLED_PLUGIN = """
from hicache_core.hookspecs import BackendRecord, hookimpl

@hookimpl
def hicache_storage_backend():  # the real hook is hicache_storage_backends
    yield BackendRecord(name="typo", target="typo_pkg.store:Store")
"""


def test_misspelled_hook_fails_loudly(tmp_path, monkeypatch, caplog):
    """pluggy accepts an unknown hook name silently; hicache refuses the plugin and says which hook was meant."""
    site = install_plugin(tmp_path / "s", "hicache-plugin-typo", "typo_pkg", MISSPELLED_PLUGIN, "typo")
    monkeypatch.syspath_prepend(str(site))
    pm = HiCachePluginManager()
    failure = pm.failures["typo"]
    assert failure.distribution == "hicache-plugin-typo"
    assert "unknown hook 'hicache_storage_backend' (did you mean 'hicache_storage_backends'?)" in failure.error
    assert "hicache_storage_backend" in caplog.text and not pm.has_plugin("typo")
    with pytest.raises(
        BackendLoadError,
        match=r"plugin hicache-plugin-typo failed to load \(implements unknown hook "
        r"'hicache_storage_backend'.*rename the hook.*HICACHE_PLUGINS_DISABLE=typo",
    ):
        resolve("typo", {}, pm)
    with pytest.raises(
        BackendLoadError,
        match=r"unknown storage backend 'other'.*plugin typo \(hicache-plugin-typo\) "
        r"failed to load: implements unknown hook",
    ):
        resolve("other", {}, pm)
    r = run_cli("backends", pythonpath=[site])
    assert r.returncode == 0 and "did you mean 'hicache_storage_backends'" in r.stdout


def test_record_requiring_a_missing_module_does_not_load(tmp_path, monkeypatch):
    """A backend whose run-time module is absent is reported as not loading, with the install hint."""
    plugin = VENDOR_PLUGIN.replace(
        'description="a vendor\'s v0 store")',
        'description="needs its SDK", requires=("vendor_sdk_not_installed.client",), '
        'install_hint="pip install vendor-sdk")',
    ).replace("vendor_store.", "sdk_store.")
    site = install_plugin(
        tmp_path / "s", "hicache-plugin-vendor", "sdk_store", plugin, "vendor", {"store": VENDOR_STORE}
    )
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(
        BackendLoadError,
        match=r"needs the module 'vendor_sdk_not_installed.client', which is not "
        r"installed; pip install vendor-sdk",
    ):
        resolve("vendor", {}, HiCachePluginManager())
    r = run_cli("backends", pythonpath=[site])
    assert "does not load: storage backend 'vendor'" in r.stdout and "pip install vendor-sdk" in r.stdout


def test_unknown_name_lists_available_and_install_hint():
    pm = HiCachePluginManager(load_entry_points=False)
    with pytest.raises(
        BackendLoadError,
        match="unknown storage backend 'mooncake'; available: memory, dynamic; "
        "to add it: pip install hicache-plugin-mooncake",
    ):
        resolve("mooncake", {}, pm)


def test_dynamic_v1_class_loads_and_roundtrips():
    extra = {
        "backend_name": "mem2",
        "module_path": "hicache_core.storage.memory",
        "class_name": "MemoryStorage",
        "interface_v1": 1,
        "store": "dyn-test",
    }
    pool = pool_for("page_first")
    handle = create_backend("dynamic", storage_config("page_first", extra, hicache_storage_backend="dynamic"), pool)
    assert handle.name == "mem2" and handle.interface_v1
    roundtrip(handle, pool)


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_sglang_style_class_loads_unchanged(tmp_path, monkeypatch, layout):
    (tmp_path / "sglang_style_store.py").write_text(SGLANG_STYLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = {"backend_name": "custom", "module_path": "sglang_style_store", "class_name": "SGLangStyleStore", "opt": 7}
    pool = pool_for(layout)
    sc = storage_config(layout, extra, hicache_storage_backend="dynamic")
    handle = create_backend("dynamic", sc, pool)
    assert handle.raw.kwargs["opt"] == 7 and not handle.interface_v1
    keys = roundtrip(handle, pool)
    # the core applied the namespace for it: its raw keys are namespaced
    assert set(handle.raw.data) == set(sc.namespace.keys(keys))


@pytest.mark.parametrize(
    "extra, match",
    [
        (
            {"backend_name": "x", "module_path": "no_such_module_xyz", "class_name": "C"},
            r"cannot import module 'no_such_module_xyz'.*"
            r"install the package that provides it or put its directory on PYTHONPATH",
        ),
        (
            {"backend_name": "x", "module_path": "hicache_core.storage.memory", "class_name": "Nope"},
            r"has no class 'Nope'; classes there: .*MemoryStorage",
        ),
        (
            {"backend_name": "x", "module_path": "hicache_core.storage.memory", "class_name": "threading"},
            r"is a module, not a class",
        ),
        (
            {"backend_name": "x", "module_path": "hicache_core.config", "class_name": "HiCacheConfig"},
            r"lacks get, set, exists, which a v0 \(interface_v1=0\) storage backend implements",
        ),
        (
            {
                "backend_name": "x",
                "module_path": "hicache_core.config",
                "class_name": "HiCacheConfig",
                "interface_v1": 1,
            },
            r"lacks batch_get_v1, batch_set_v1, batch_exists",
        ),
        (
            {"backend_name": "x", "module_path": "m", "class_name": "C", "interface_v1": "maybe"},
            r"interface_v1='maybe' is not a boolean",
        ),
        ({"module_path": "m", "class_name": "C"}, r"extra-config with backend_name"),
    ],
)
def test_dynamic_errors(extra, match):
    with pytest.raises((BackendLoadError, ConfigError), match=match):
        resolve("dynamic", extra)


def test_dynamic_module_that_raises(tmp_path, monkeypatch):
    (tmp_path / "explodes.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendLoadError, match="importing module 'explodes' raised RuntimeError: boom at import"):
        resolve("dynamic", {"backend_name": "x", "module_path": "explodes", "class_name": "C"})


def test_constructor_failure_is_wrapped(tmp_path, monkeypatch):
    (tmp_path / "badctor.py").write_text(
        SGLANG_STYLE.replace("self.rank = storage_config.tp_rank", "raise OSError('no such device')")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = {"backend_name": "bad", "module_path": "badctor", "class_name": "SGLangStyleStore"}
    with pytest.raises(BackendLoadError, match=r"'bad' .*failed to start: OSError: no such device"):
        create_backend("dynamic", storage_config(extra=extra), pool_for())


# --- the CLI --------------------------------------------------------------------------------------------------------
def test_cli_backends_lists_installed_plugin(vendor_site):
    r = run_cli("backends", pythonpath=[vendor_site])
    assert r.returncode == 0, r.stderr
    assert "memory" in r.stdout and "vendor" in r.stdout and "hicache-plugin-vendor" in r.stdout and "0.3.1" in r.stdout


def test_cli_check_roundtrips_through_plugin(vendor_site):
    r = run_cli("check", "--hicache-storage-backend", "vendor", pythonpath=[vendor_site])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check passed" in r.stdout and "bytes identical" in r.stdout


def test_cli_bad_choice_is_argparse_usage_error():
    r = run_cli("check", "--hicache-io-backend", "dma")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .endswith("argument --hicache-io-backend: invalid choice: 'dma' (choose from 'kernel', 'direct')")
    )


RAISING_STORE = """
class RaisingStore:
    def __init__(self, storage_config, kwargs):
        pass
    def register_mem_pool_host(self, pool):
        self.pool = pool
    def batch_exists(self, keys):
        return 0
    def batch_get_v1(self, keys, host_indices):
        return [False] * len(keys)
    def batch_set_v1(self, keys, host_indices):
        raise ConnectionError("storage cluster unreachable")
"""


def test_cli_check_reports_a_raising_backend_without_a_traceback(tmp_path):
    (tmp_path / "raising_store.py").write_text(RAISING_STORE)
    extra = '{"backend_name": "r", "module_path": "raising_store", "class_name": "RaisingStore", "interface_v1": 1}'
    r = run_cli(
        "check",
        "--hicache-storage-backend",
        "dynamic",
        "--hicache-storage-backend-extra-config",
        extra,
        pythonpath=[tmp_path],
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    assert (
        "the backend failed: set raised ConnectionError: storage cluster unreachable" in r.stdout
        and "check FAILED" in r.stdout
    )


def test_cli_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("hicache 0.1.0")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["check", "--hicache-storage-backend-extra-config", "{oops"], "not valid JSON"),
        (
            [
                "check",
                "--hicache-storage-backend",
                "dynamic",
                "--hicache-storage-backend-extra-config",
                '{"backend_name": "x"}',
            ],
            "module_path, class_name",
        ),
        (
            [
                "check",
                "--hicache-storage-backend",
                "dynamic",
                "--hicache-storage-backend-extra-config",
                '{"backend_name": "x", "module_path": "nowhere_mod", "class_name": "C"}',
            ],
            "cannot import module 'nowhere_mod'",
        ),
        (["check", "--hicache-storage-backend", "nope"], "unknown storage backend 'nope'"),
    ],
)
def test_cli_errors_are_one_line(argv, match):
    r = run_cli(*argv)
    assert r.returncode == 2
    assert match in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0


def test_cli_broken_plugin_selected(tmp_path):
    site = install_plugin(
        tmp_path / "s", "hicache-plugin-broken", "broken_pkg", "import not_installed_dependency\n", "broken"
    )
    r = run_cli("backends", pythonpath=[site])
    assert r.returncode == 0 and "failed to load" in r.stdout
    r = run_cli("check", "--hicache-storage-backend", "broken", pythonpath=[site])
    assert (
        r.returncode == 2
        and "pip install --force-reinstall hicache-plugin-broken" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_real_pip_install_of_a_plugin(tmp_path):
    """A plugin distribution built and installed by pip appears with no configuration."""
    proj = tmp_path / "proj"
    (proj / "acme_store").mkdir(parents=True)
    (proj / "acme_store" / "__init__.py").write_text("")
    (proj / "acme_store" / "plugin.py").write_text(
        textwrap.dedent(VENDOR_PLUGIN).replace("vendor_store.store", "acme_store.store").replace('"vendor"', '"acme"')
    )
    (proj / "acme_store" / "store.py").write_text(VENDOR_STORE)
    (proj / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "hicache-plugin-acme"
        version = "1.2.0"
        [project.entry-points.hicache]
        acme = "acme_store.plugin"
        [tool.setuptools]
        packages = ["acme_store"]
    """)
    )
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(proj),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    r = run_cli("backends", "--json", pythonpath=[site])
    assert r.returncode == 0, r.stderr
    assert '"name": "acme"' in r.stdout and '"hicache-plugin-acme"' in r.stdout and '"1.2.0"' in r.stdout
    r = run_cli("check", "--hicache-storage-backend", "acme", pythonpath=[site])
    assert r.returncode == 0 and "check passed" in r.stdout, r.stdout + r.stderr
