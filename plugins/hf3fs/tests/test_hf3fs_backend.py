"""The hf3fs backend on plain files: conformance (in-process and HTTP metadata), sharing, failures, persistence."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import BackendLoadError, ConfigError
from hicache_core.memory import HostPool, KVSpec
from hicache_core.registry import make_storage_config
from hicache_core.testing import BackendConformance, fill_random, page_bytes, random_keys
from hicache_core.testing.cli import backend_check
from hicache_plugin_hf3fs import Hf3fsConfig, Hf3fsStorage
from hicache_plugin_hf3fs.metadata import MetadataStore, RankMetadata

from conftest import MetadataServer


@contextlib.contextmanager
def read_only_file(backend):
    """Every pwrite fails for real (EBADF): the backend's own certification hook."""
    with backend.failing_writes():
        yield


class TestHf3fsInProcessMetadata(BackendConformance):
    backend_name = "hf3fs"

    def extra_config(self, tmp_path):
        return {"file_path_prefix": str(tmp_path / "hf3fs" / "cache"), "file_size": 4 << 20, "numjobs": 4, "entries": 8}


class TestHf3fsHttpMetadata(TestHf3fsInProcessMetadata):
    @pytest.fixture(autouse=True)
    def _server(self, metadata_server):
        self.url = metadata_server.url

    def extra_config(self, tmp_path):
        return {**super().extra_config(tmp_path), "metadata_server_url": self.url}


SPEC = KVSpec(layer_num=2, head_num=2, head_dim=16, dtype=torch.bfloat16)
PS = 8


def make(tmp_path, layout="page_first_direct", **extra):
    pool = HostPool(SPEC, 32 * PS, PS, layout, pin_memory=False)
    cfg = HiCacheConfig(page_size=PS, hicache_mem_layout=layout, model_name="h3")
    ex = {"file_path_prefix": str(tmp_path / "c"), "file_size": 1 << 20, "numjobs": 2, "entries": 4, **extra}
    be = Hf3fsStorage(make_storage_config(cfg, SPEC), ex)
    be.register_mem_pool_host(pool)
    return be, pool


def test_slot_layout_and_file(tmp_path):
    be, pool = make(tmp_path)
    assert be.slot_bytes % 4096 == 0 and be.slot_bytes >= 64 + pool.page_bytes
    assert be.num_slots == (1 << 20) // be.slot_bytes
    assert os.path.getsize(be.path) == be.num_slots * be.slot_bytes and be.namespace.tag in be.path
    assert be.get_stats()["io_client"] == "posix"


def test_lru_reuses_the_oldest_slot_when_full(tmp_path):
    be, pool = make(tmp_path, file_size=3 * 4096)
    assert be.num_slots == 3
    src = pool.alloc(4 * PS)
    fill_random(pool, src)
    keys = random_keys(4, PS)
    assert be.batch_set_v1(keys[:3], src[: 3 * PS]) == [True] * 3
    assert be.batch_get_v1(keys[:1], pool.alloc(PS)) == [True]  # key 0 is recent now
    assert be.batch_set_v1(keys[3:], src[3 * PS :]) == [True]
    assert [be.exists(k) for k in keys] == [True, False, True, True]
    dst = pool.alloc(PS)
    assert be.batch_get_v1(keys[3:], dst) == [True] and page_bytes(pool, dst) == page_bytes(pool, src[3 * PS :])


def test_reused_slot_read_with_a_stale_index_is_a_miss(tmp_path):
    """A reader that looked a key up just before its slot was given to another key never gets the other page."""
    be, pool = make(tmp_path, file_size=2 * 4096)
    src = pool.alloc(3 * PS)
    fill_random(pool, src)
    keys = random_keys(3, PS)
    be.batch_set_v1(keys[:2], src[: 2 * PS])
    slot_of_k0 = be.meta.store.rank(be.rank_id).key_to_index[keys[0]]  # peek without touching the LRU
    be.batch_set_v1(keys[2:], src[2 * PS :])  # evicts key 0, reuses its slot
    stale = be.meta.get_page_indices
    be.meta.get_page_indices = lambda rank, ks: [slot_of_k0 for _ in ks]  # the lookup raced the eviction
    try:
        assert be.batch_get_v1(keys[:1], pool.alloc(PS)) == [False]
    finally:
        be.meta.get_page_indices = stale
    assert be.get_stats()["corrupt"] == 1


def test_write_that_fails_is_never_visible_and_frees_its_slot(tmp_path):
    be, pool = make(tmp_path)
    src = pool.alloc(2 * PS)
    fill_random(pool, src)
    keys = random_keys(2, PS)
    free_before = be.meta.store.rank(be.rank_id).free_count()
    with read_only_file(be):
        assert be.batch_set_v1(keys, src) == [False, False]
    assert be.batch_exists(keys) == 0
    assert be.meta.store.rank(be.rank_id).free_count() == free_before


def test_reserved_but_unconfirmed_is_invisible_and_not_persisted():
    m = RankMetadata(4)
    ((exists, slot),) = m.reserve_and_allocate_page_indices(["k"])
    assert not exists and m.exists(["k"]) == [False] and m.get_page_indices(["k"]) == [None]
    restored = RankMetadata.from_json(m.to_json())  # a crash before confirm: the slot is free again
    assert slot in restored.free_pages and restored.exists(["k"]) == [False]
    m.confirm_write([("k", slot)], [])
    assert m.exists(["k"]) == [True]


def test_server_restart_with_persistence_keeps_confirmed_pages(tmp_path):
    server = MetadataServer(str(tmp_path / "index.json"))
    server.start()
    try:
        be, pool = make(tmp_path, metadata_server_url=server.url)
        src = pool.alloc(3 * PS)
        fill_random(pool, src)
        keys = random_keys(3, PS)
        assert be.batch_set_v1(keys, src) == [True] * 3
        server.stop()
        assert be.batch_exists(keys) == 0  # server down: misses, no crash
        assert be.get_stats()["metadata_errors"] >= 1
        server.start()
        be2, pool2 = make(tmp_path, metadata_server_url=server.url)
        dst = pool2.alloc(3 * PS)
        assert be2.batch_exists(keys) == 3
        assert be2.batch_get_v1(keys, dst) == [True] * 3
        assert page_bytes(pool2, dst) == page_bytes(pool, src)
    finally:
        server.stop()


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_bad_requests_get_4xx_with_a_reason(metadata_server):
    u = metadata_server.url
    code, body = _post(f"{u}/nope-rank/exists", {"keys": ["a"]})
    assert code == 404 and b"not initialized" in body
    assert _post(f"{u}/r1/initialize", {"num_pages": 10})[0] == 204
    code, body = _post(f"{u}/r1/initialize", {"num_pages": 11})
    assert code == 409 and b"10 pages, not 11" in body
    code, body = _post(f"{u}/r1/initialize", {"num_pages": -3})
    assert code == 422 and b"num_pages" in body
    code, body = _post(f"{u}/r1/exists", {"kays": ["a"]})
    assert code == 422 and b"keys" in body
    code, body = _post(f"{u}/r1/confirm_write", {"written_keys_to_confirm": [["a", 99]]})
    assert code == 422 and b"out of range" in body


def test_config_sources_and_errors(tmp_path, monkeypatch):
    f = tmp_path / "hf3fs.json"
    f.write_text(json.dumps({"file_path_prefix": "/x/y", "file_size": 1 << 30, "numjobs": 8, "entries": 4}))
    monkeypatch.setenv("SGLANG_HICACHE_HF3FS_CONFIG_PATH", str(f))
    c = Hf3fsConfig.load({})
    assert (c.file_path_prefix, c.file_size, c.numjobs) == ("/x/y", 1 << 30, 8) and "file" in c.source
    assert Hf3fsConfig.load({"file_path_prefix": "/z", "file_size": 4096}).file_path_prefix == "/z"
    f.write_text(json.dumps({"file_path_prefix": "/x"}))
    with pytest.raises(ConfigError, match="lacks file_size, numjobs, entries"):
        Hf3fsConfig.load({})
    monkeypatch.delenv("SGLANG_HICACHE_HF3FS_CONFIG_PATH")
    with pytest.raises(ConfigError, match="numjobs=0 must be a whole number >= 1"):
        Hf3fsConfig.load({"file_path_prefix": "/z", "numjobs": 0})
    with pytest.raises(ConfigError, match="metadata_server_url='localhost:1' must be an http:// or https:// URL"):
        Hf3fsConfig.load({"file_path_prefix": "/z", "metadata_server_url": "localhost:1"})
    with pytest.raises(ConfigError, match="holds no slot"):
        make(tmp_path, file_size=100)
    assert Hf3fsConfig.load({}).file_path_prefix == "/data/hicache"  # SGLang's single-machine default
    with pytest.raises(ConfigError, match=r"unknown key 'file_sise' \(did you mean 'file_size'\?\)"):
        Hf3fsConfig.load({"file_path_prefix": "/z", "file_sise": 4096})
    with pytest.raises(ConfigError, match="io_client='fast'; choose one of auto, usrbio, posix"):
        Hf3fsConfig.load({"io_client": "fast"})
    assert Hf3fsConfig.load({"file_size": "1gb", "file_path_prefix": "/z"}).file_size == 1 << 30


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    from hicache_core.config import HiCacheConfig
    from hicache_core.memory import HostPool, KVSpec
    from hicache_core.registry import make_storage_config
    from hicache_plugin_hf3fs import Hf3fsStorage

    role, prefix, url, shared = sys.argv[1:5]
    spec = KVSpec(layer_num=2, head_num=2, head_dim=16, dtype=torch.bfloat16)
    pool = HostPool(spec, 16 * 8, 8, "layer_first", pin_memory=False)
    be = Hf3fsStorage(make_storage_config(HiCacheConfig(page_size=8), spec),
                      {"file_path_prefix": prefix, "file_size": 1 << 22, "numjobs": 2, "entries": 4,
                       "metadata_server_url": url})
    be.register_mem_pool_host(pool)
    idx = pool.alloc(4 * 8)
    if role == "writer":
        pool.raw.copy_(torch.randint(0, 256, pool.raw.shape, dtype=torch.uint8))
        keys = [os.urandom(32).hex() for _ in range(4)]
        assert be.batch_set_v1(keys, idx) == [True] * 4
        pages = [b"".join(bytes(s) for s in segs).hex() for segs in pool.page_memoryviews(idx)]
        Path(shared).write_text(json.dumps({"keys": keys, "pages": pages}))
    else:
        data = json.loads(Path(shared).read_text())
        assert be.batch_exists(data["keys"]) == 4
        ok = be.batch_get_v1(data["keys"], idx)
        got = [b"".join(bytes(s) for s in segs).hex() for segs in pool.page_memoryviews(idx)]
        print(json.dumps({"ok": ok, "same": got == data["pages"]}))
""")


def test_two_processes_share_through_the_http_server(tmp_path, metadata_server):
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    args = [str(tmp_path / "shared" / "cache"), metadata_server.url, str(tmp_path / "keys.json")]
    w = subprocess.run(
        [sys.executable, str(script), "writer", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert w.returncode == 0, w.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, str(script), "reader", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"ok": [True] * 4, "same": True}


@pytest.mark.parametrize(
    "content, why",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "holds list, not an object of ranks"),
        ('{"r": {"num_pages": 4}}', "lacks 'free_pages'"),
        ('{"r": {"num_pages": 4, "free_pages": [9], "key_to_index": []}}', "slot numbers outside"),
        ('{"r": {"num_pages": 4, "free_pages": [1], "key_to_index": [["k", 1]]}}', "listed twice"),
        ('{"r": {"num_pages": "4", "free_pages": [], "key_to_index": []}}', "'4' is not a whole number"),
        ('{"r": {"num_pages": 4, "free_pages": [], "key_to_index": [["k"]]}}', "wrong shape"),
    ],
)
def test_a_damaged_index_is_refused_with_what_is_wrong(tmp_path, content, why):
    bad = tmp_path / "index.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match="index file .*damaged|index file .*holds") as e:
        MetadataStore(str(bad))
    assert why in str(e.value) and "move" in str(e.value)


def test_cli_server_refuses_a_broken_index(tmp_path):
    bad = tmp_path / "index.json"
    bad.write_bytes(b"\xff\xfe garbage")
    r = subprocess.run(
        [sys.executable, "-m", "hicache_plugin_hf3fs.server", "--persist-path", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert r.returncode == 2 and "index file" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_reservations_are_leases_and_a_late_confirm_is_refused(tmp_path):
    m = RankMetadata(2, lease_s=0.2)
    (_, s1), (_, s2) = m.reserve_and_allocate_page_indices(["a", "b"])  # the client then dies
    assert m.free_count() == 0
    time.sleep(0.3)
    ((_, s3),) = m.reserve_and_allocate_page_indices(["c"])  # the dead client's slots came back
    assert m.free_count() == 1 and s3 in (s1, s2)
    assert m.confirm_write([("a", s1), ("b", s2)], []) == ["a", "b"]  # s3 is c's now: a may not take it
    assert m.exists(["a", "b"]) == [False, False]
    assert m.confirm_write([("c", s3)], []) == [] and m.exists(["c"]) == [True]
    # a backend whose confirm comes after its lease: the write is reported failed, never visible
    be, pool = make(tmp_path)
    rank = be.meta.store.rank(be.rank_id)
    rank.lease_s = 0.0
    src = pool.alloc(2 * PS)
    fill_random(pool, src)
    keys = random_keys(2, PS)
    assert be.batch_set_v1(keys, src) == [False, False]
    assert be.batch_exists(keys) == 0 and be.get_stats()["lease_expired"] == 2
    rank.lease_s = 60.0
    assert be.batch_set_v1(keys, src) == [True, True]


def test_retried_reserve_is_idempotent_and_huge_files_cost_nothing(metadata_server):
    u = metadata_server.url
    assert _post(f"{u}/big/initialize", {"num_pages": 10**9})[0] == 204  # slots are handed out lazily
    body = {"keys": [["k1", ""], ["k2", ""]], "request_id": "req-1"}
    first = json.loads(_post(f"{u}/big/reserve_and_allocate_page_indices", body)[1])
    again = json.loads(_post(f"{u}/big/reserve_and_allocate_page_indices", body)[1])
    assert first == again  # the retry got the same slots, not two more
    other = json.loads(_post(f"{u}/big/reserve_and_allocate_page_indices", {**body, "request_id": "req-2"})[1])
    assert {s for _, s in other["indices"]}.isdisjoint({s for _, s in first["indices"]})
    code, body = _post(f"{u}/big/initialize", {"num_pages": 2**41})
    assert code == 422
    code, body = _post(f"{u}/big/exists", {"keys": ["k"] * 5000})
    assert code == 422 and b"keys" in body


def test_bearer_token_is_required_when_configured(tmp_path):
    server = MetadataServer(None, "--auth-token", "tok3n")
    server.start()
    try:
        code, body = _post(f"{server.url}/r/initialize", {"num_pages": 4})
        assert code == 401 and b"bearer token" in body
        with pytest.raises(BackendLoadError, match="401"):
            make(tmp_path, metadata_server_url=server.url)
        be, pool = make(tmp_path, metadata_server_url=server.url, metadata_auth_token="tok3n")
        src = pool.alloc(PS)
        fill_random(pool, src)
        keys = random_keys(1, PS)
        assert be.batch_set_v1(keys, src) == [True] and be.batch_exists(keys) == 1
    finally:
        server.stop()


def test_bench_storage_against_plain_positional_io(tmp_path, capsys):
    from hicache_core.cli import main

    rc = main(
        [
            "bench",
            "storage",
            "--hicache-storage-backend",
            "hf3fs",
            "--hicache-storage-backend-extra-config",
            json.dumps({"file_path_prefix": str(tmp_path / "b"), "file_size": 64 << 20, "numjobs": 4, "entries": 8}),
            "--total-mib",
            "8",
            "--page-kib",
            "256",
            "--repeat",
            "1",
        ]
    )
    assert rc == 0 and "os.pwritev/preadv" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path) if "bench-baseline" in f]  # the baseline's file is removed


CLI_CASES = [
    (
        "hf3fs unknown key",
        backend_check("hf3fs", {"file_path_prefix": "{tmp}/h", "numjob": 2}),
        "did you mean 'numjobs'",
    ),
    (
        "hf3fs numjobs 0",
        backend_check("hf3fs", {"file_path_prefix": "{tmp}/h", "numjobs": 0}),
        "numjobs=0 must be a whole number",
    ),
    (
        "hf3fs file size negative",
        backend_check("hf3fs", {"file_path_prefix": "{tmp}/h", "file_size": -1}),
        "must be >= 0",
    ),
    (
        "hf3fs file size tiny",
        backend_check("hf3fs", {"file_path_prefix": "{tmp}/h", "file_size": 100}),
        "holds no slot",
    ),
    (
        "hf3fs url scheme",
        backend_check("hf3fs", {"file_path_prefix": "{tmp}/h", "metadata_server_url": "ftp://x"}),
        "must be an http:// or https:// URL",
    ),
    (
        "hf3fs io client",
        backend_check("hf3fs", {"file_path_prefix": "{tmp}/h", "io_client": "fast"}),
        "choose one of auto",
    ),
    (
        "hf3fs prefix number",
        backend_check("hf3fs", {"file_path_prefix": 7}),
        "file_path_prefix=7 must be a non-empty string",
    ),
    (
        "hf3fs metadata down",
        backend_check("hf3fs", {"file_path_prefix": "{tmp}/h", "metadata_server_url": "http://127.0.0.1:9"}),
        "metadata service refused initialize",
    ),
]


@pytest.mark.parametrize("argv, expected", [(c[1], c[2]) for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_malformed_cli_input_is_one_clear_error(argv, expected, tmp_path, capsys):
    from hicache_core.cli import main
    from hicache_core.testing.cli import assert_clear_cli_error

    assert_clear_cli_error(main, [a.replace("{tmp}", str(tmp_path)) for a in argv], expected, capsys)


@pytest.mark.parametrize("metadata", ["in-process", "http"])
def test_hf3fs_backend_certifies(tmp_path, capsys, metadata, metadata_server):
    from hicache_core.cli import main

    extra = {"file_path_prefix": "{tmp}/hf3fs", "file_size": 8 << 20, "numjobs": 2}
    if metadata == "http":
        extra["metadata_server_url"] = metadata_server.url
    rc = main(
        [
            "certify",
            "--hicache-storage-backend",
            "hf3fs",
            "--hicache-storage-backend-extra-config",
            json.dumps(extra),
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    not_passed = [r for r in report["rows"] if r["outcome"] != "passed"]
    failed = "\n".join(f"{r['part']} {r['name']}: {r['detail']}" for r in not_passed if r["outcome"] == "FAILED")
    assert rc == 0 and report["passed"], f"rc={rc}; failed rows:\n{failed}"
    assert [r["name"] for r in not_passed] == ["test_unserved_layout_is_refused"]


def test_extra_config_refuses_strings_for_numbers():
    from hicache_core.errors import ConfigError
    from hicache_core.storage.options import string_holes
    from hicache_plugin_hf3fs.config import Hf3fsConfig

    assert string_holes(Hf3fsConfig) == []
    with pytest.raises(ConfigError, match=r"numjobs='16' is a string; write a whole number as a JSON number"):
        Hf3fsConfig.load({"numjobs": "16"})


def test_slot_accounting_survives_clear_and_dead_writers():
    import time as _time

    from hicache_plugin_hf3fs.metadata import RankMetadata

    m = RankMetadata(8, lease_s=0.2)
    got = m.reserve_and_allocate_page_indices([f"k{i}" for i in range(5)])
    m.confirm_write([(f"k{i}", slot) for i, (_, slot) in enumerate(got[:3])], [])  # k3, k4: their writer died
    assert m.stats() == {"num_pages": 8, "keys": 3, "reserved": 2, "free": 3, "doubled": 0, "lost": 0}
    _time.sleep(0.3)  # the dead writer's leases run out: their slots come back
    assert m.stats() == {"num_pages": 8, "keys": 3, "reserved": 0, "free": 5, "doubled": 0, "lost": 0}
    m.clear()  # clear once forgot the keys' slots: they were neither free nor held, lost until a restart
    assert m.stats() == {"num_pages": 8, "keys": 0, "reserved": 0, "free": 8, "doubled": 0, "lost": 0}
    assert len({slot for _, slot in m.reserve_and_allocate_page_indices([f"n{i}" for i in range(8)])}) == 8
