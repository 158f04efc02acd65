"""The mooncake backend against a real mooncake_master on loopback."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import BackendLoadError, ConfigError
from hicache_core.memory import HostPool, KVSpec
from hicache_core.registry import make_storage_config
from hicache_core.testing import BackendConformance, fill_random, page_bytes, random_keys
from hicache_core.testing.cli import backend_check
from hicache_plugin_mooncake import MooncakeStore, MooncakeStoreConfig


def wait_healthy(backend, timeout=30.0):
    """Until a real put goes through (the client re-mounts its segment after a master restart)."""
    pool = backend.mem_pool_host
    idx = pool.alloc(pool.page_size)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if backend.batch_set_v1(random_keys(1, pool.page_size), idx) == [True]:
                return
            time.sleep(0.2)
        raise AssertionError("mooncake did not recover after the master restart")
    finally:
        pool.free(idx)


class TestMooncakeConformance(BackendConformance):
    backend_name = "mooncake"
    supports_v0 = False  # zero copy only: pages move between registered buffers

    @pytest.fixture(autouse=True)
    def _master(self, master):
        self.m = master

    def extra_config(self, tmp_path):
        return self.m.extra()

    @contextlib.contextmanager
    def failing_writes(self, backend):
        self.m.stop()  # a dead master: every put fails
        try:
            yield
        finally:
            self.m.start()
            wait_healthy(backend)


SPEC = KVSpec(layer_num=2, head_num=2, head_dim=16, dtype=torch.bfloat16)
PS = 8


def make(master, layout="page_first_direct", spec=SPEC, pool_pages=32, **extra):
    pool = HostPool(spec, pool_pages * PS, PS, layout, pin_memory=False)
    cfg = HiCacheConfig(page_size=PS, hicache_mem_layout=layout, model_name="mc-test")
    be = MooncakeStore(make_storage_config(cfg, spec), master.extra(**extra))
    be.register_mem_pool_host(pool)
    return be, pool


# --- configuration ------------------------------------------------------------------------------------------------
def test_config_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONCAKE_MASTER", "10.0.0.1:1")
    f = tmp_path / "mc.json"
    f.write_text(
        json.dumps(
            {
                "master_server_address": "127.0.0.2:50051",
                "metadata_server": "http://127.0.0.2:8080/metadata",
                "global_segment_size": "2gb",
                "protocol": "tcp",
            }
        )
    )
    monkeypatch.setenv("SGLANG_HICACHE_MOONCAKE_CONFIG_PATH", str(f))
    c = MooncakeStoreConfig.load({"master_server_address": "127.0.0.3:1234"})
    assert c.master_server_address == "127.0.0.3:1234" and c.source == "--hicache-storage-backend-extra-config"
    c = MooncakeStoreConfig.load({})
    assert c.master_server_address == "127.0.0.2:50051" and c.global_segment_size == 2 << 30 and "file" in c.source
    monkeypatch.delenv("SGLANG_HICACHE_MOONCAKE_CONFIG_PATH")
    monkeypatch.setenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", "512mb")
    monkeypatch.setenv("MOONCAKE_TE_META_DATA_SERVER", "http://127.0.0.1:8080/metadata")
    monkeypatch.setenv("MOONCAKE_PROTOCOL", "rdma")
    monkeypatch.setenv("MOONCAKE_DEVICE", "mlx5_0")
    c = MooncakeStoreConfig.load({})
    assert (c.master_server_address, c.global_segment_size, c.protocol, c.device_name) == (
        "10.0.0.1:1",
        512 << 20,
        "rdma",
        "mlx5_0",
    )
    assert c.metadata_server == "http://127.0.0.1:8080/metadata" and c.local_buffer_size == 16 << 20


@pytest.mark.parametrize(
    "env, extra, match",
    [
        ({}, {}, "no configuration found.*MOONCAKE_MASTER"),
        ({"MOONCAKE_MASTER": "nohost"}, {}, "MOONCAKE_MASTER|master_server_address='nohost' is not host:port"),
        (
            {"MOONCAKE_MASTER": "127.0.0.1:1", "MOONCAKE_GLOBAL_SEGMENT_SIZE": "huge"},
            {},
            "MOONCAKE_GLOBAL_SEGMENT_SIZE='huge' is not a size",
        ),
        ({"MOONCAKE_MASTER": "127.0.0.1:1", "MOONCAKE_PROTOCOL": "udp"}, {}, "protocol='udp'; choose one of tcp, rdma"),
        (
            {},
            {"master_server_address": "127.0.0.1:1", "colour": "red"},
            "unknown key 'colour'.*known keys: master_server_address",
        ),
        ({"MOONCAKE_MASTER": "127.0.0.1:1"}, {"conect_timeout_s": 3}, r"did you mean 'connect_timeout_s'\?"),
        (
            {},
            {"master_server_address": "127.0.0.1:1", "connect_timeout_s": float("nan")},
            "connect_timeout_s=nan must be a finite number > 0",
        ),
        (
            {},
            {"master_server_address": "127.0.0.1:1", "global_segment_size": -1},
            "global_segment_size=-1 must be >= 0",
        ),
        ({"SGLANG_HICACHE_MOONCAKE_CONFIG_PATH": "/no/such.json"}, {}, "cannot read"),
    ],
)
def test_config_errors(monkeypatch, env, extra, match):
    for k in (
        "MOONCAKE_MASTER",
        "SGLANG_HICACHE_MOONCAKE_CONFIG_PATH",
        "MOONCAKE_PROTOCOL",
        "MOONCAKE_GLOBAL_SEGMENT_SIZE",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=match):
        MooncakeStoreConfig.load(extra)


def test_unreachable_master_fails_within_the_timeout():
    from conftest import free_port

    port = free_port()
    cfg = HiCacheConfig(page_size=PS, hicache_mem_layout="page_first")
    t0 = time.monotonic()
    with pytest.raises(BackendLoadError, match=r"cannot reach the mooncake_master at 127.0.0.1:\d+ .*start it"):
        MooncakeStore(
            make_storage_config(cfg, SPEC),
            {
                "master_server_address": f"127.0.0.1:{port}",
                "metadata_server": f"http://127.0.0.1:{port}/metadata",
                "connect_timeout_s": 2,
                "local_hostname": "127.0.0.1",
            },
        )
    assert time.monotonic() - t0 < 10


def test_hung_master_fails_fast_instead_of_freezing_the_process(tmp_path):
    """A master that is alive but stopped (SIGSTOP) still accepts TCP connections; the client's setup would then
    hold the GIL for minutes. The HTTP probes see no answer and fail in seconds, in process and at the CLI."""
    import signal

    from conftest import Master

    m = Master(str(tmp_path))
    m.start()
    try:
        os.kill(m.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(BackendLoadError, match="accepts connections but does not answer .*hung or stopped"):
            make(m, connect_timeout_s=2)
        assert time.monotonic() - t0 < 10
        t0 = time.monotonic()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "hicache_core.cli",
                "check",
                "--hicache-storage-backend",
                "mooncake",
                "--hicache-mem-layout",
                "page_first",
                "--hicache-storage-backend-extra-config",
                json.dumps(m.extra(connect_timeout_s=2)),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and "hung or stopped" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert time.monotonic() - t0 < 60
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
        m.stop()


def test_master_hung_after_connect_costs_at_most_a_deadline(tmp_path):
    """Once connected, the client's calls wait for a stopped master without the GIL: the core's deadline bounds
    each call, and while one call is abandoned the backend counts as hung (calls fail at once).

    What is guaranteed, and so asserted: with the master stopped, no call takes longer than one deadline (plus
    slack), the calls together no longer than two; every answer is right or a miss (a never-written key never
    exists, bytes read are the bytes written); after the master resumes, the pages are there. Not asserted: which
    calls the client answers by itself -- seen across fresh venvs: ``batch_exists`` of keys it wrote gave 2, and
    of never-written keys gave 0 at once, with the master stopped; both answers are true."""
    import signal

    from hicache_core.metrics import CacheMetrics
    from hicache_core.storage.guard import GuardedStorage

    from conftest import Master

    m = Master(str(tmp_path))
    m.start()
    be, pool = make(m)
    metrics = CacheMetrics()
    guard = GuardedStorage(be, metrics, timeout_s=1.0, max_abandoned=1)
    keys = random_keys(2, PS)
    idx = pool.alloc(2 * PS)
    pool.raw.copy_(torch.randint(0, 256, pool.raw.shape, dtype=torch.uint8))
    written = [b"".join(bytes(s) for s in segs) for segs in pool.page_memoryviews(idx)]
    dst = pool.alloc(2 * PS)

    def read_back() -> list[bytes]:
        return [b"".join(bytes(s) for s in segs) for segs in pool.page_memoryviews(dst)]

    try:
        assert guard.batch_set_v1(keys, idx).ok == 2
        os.kill(m.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        for call in ("exists-new", "get", "exists-own"):
            t = time.monotonic()
            if call == "exists-new":
                assert guard.batch_exists(random_keys(2, PS)).ok == 0  # never written: never found
            elif call == "get":
                got = guard.batch_get_v1(keys, dst).ok
                assert got in (0, 1, 2) and read_back()[:got] == written[:got]  # right, or a miss
            else:
                assert guard.batch_exists(keys).ok in (0, 1, 2)
            assert time.monotonic() - t < 2.5, f"{call} took {time.monotonic() - t:.1f}s with the master stopped"
        assert time.monotonic() - t0 < 3.5, metrics.stats()["storage_errors"]
        os.kill(m.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while guard.abandoned_calls() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.batch_exists(keys).ok == 2
        assert guard.batch_get_v1(keys, dst).ok == 2
        assert read_back() == written
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
        guard.close()
        m.stop()


def test_layer_first_is_refused_with_the_fix(master):
    """The plugin's record declares page-first only; the core refuses layer_first before connecting."""
    from hicache_core.registry import create_backend

    pool = HostPool(SPEC, 32 * PS, PS, "layer_first", pin_memory=False)
    cfg = HiCacheConfig(page_size=PS, model_name="mc-test", hicache_storage_backend_extra_config=master.extra())
    with pytest.raises(
        ConfigError, match="page_first/page_first_direct host layouts.*page_first_direct \\(direct io\\)"
    ):
        create_backend("mooncake", make_storage_config(cfg, SPEC), pool)


def test_keys_carry_namespace_and_tag(master):
    be, pool = make(master, extra_backend_tag="blue")
    assert be.prefix == f"blue_{be.namespace.tag}_"
    assert be._keys(["abc"]) == [f"blue_{be.namespace.tag}_abc_k", f"blue_{be.namespace.tag}_abc_v"]
    mla = KVSpec(layer_num=2, head_num=1, head_dim=32, dtype=torch.bfloat16, is_mla=True)
    be2, _ = make(master, "page_first", spec=mla)
    assert be2._keys(["abc"]) == [f"{be2.namespace.tag}_abc_k"]
    be.close()
    be2.close()


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    from hicache_core.config import HiCacheConfig
    from hicache_core.memory import HostPool, KVSpec
    from hicache_core.registry import make_storage_config
    from hicache_plugin_mooncake import MooncakeStore

    role, extra, keys_file, done_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    spec = KVSpec(layer_num=2, head_num=2, head_dim=16, dtype=torch.bfloat16)
    pool = HostPool(spec, 16 * 8, 8, "page_first", pin_memory=False)
    be = MooncakeStore(make_storage_config(HiCacheConfig(page_size=8, hicache_mem_layout="page_first"), spec), extra)
    be.register_mem_pool_host(pool)
    idx = pool.alloc(4 * 8)
    if role == "writer":
        gen = torch.Generator().manual_seed(7)
        pool.raw.copy_(torch.randint(0, 256, pool.raw.shape, dtype=torch.uint8, generator=gen))
        keys = [os.urandom(32).hex() for _ in range(4)]
        assert be.batch_set_v1(keys, idx) == [True] * 4
        pages = [b"".join(bytes(s) for s in segs).hex() for segs in pool.page_memoryviews(idx)]
        Path(keys_file + ".tmp").write_text(json.dumps({"keys": keys, "pages": pages}))
        os.replace(keys_file + ".tmp", keys_file)
        deadline = time.time() + 120
        while not os.path.exists(done_file) and time.time() < deadline:  # its segment holds the pages: stay up
            time.sleep(0.05)
    else:
        while not os.path.exists(keys_file):
            time.sleep(0.05)
        data = json.loads(Path(keys_file).read_text())
        assert be.batch_exists(data["keys"]) == 4
        ok = be.batch_get_v1(data["keys"], idx)
        got = [b"".join(bytes(s) for s in segs).hex() for segs in pool.page_memoryviews(idx)]
        open(done_file, "w").close()
        print(json.dumps({"ok": ok, "same": got == data["pages"]}))
    be.close()
""")


def test_writers_racing_on_one_key_each_read_what_they_stored(master):
    """Six threads put the same pages and read them back at once, twenty times over. The master answers a put of a
    key whose first put is still in flight as stored; the read then finds it not ready (-703). Found in CI: the
    plugin counted that as a miss right after saying the page was stored. Now it waits for the other writer."""
    import threading

    be, pool = make(master, pool_pages=64)
    try:
        misses, wrong = [], []
        for trial in range(20):
            keys = random_keys(2, PS)
            src = pool.alloc(2 * PS)
            fill_random(pool, src)
            want = page_bytes(pool, src)
            dsts = [pool.alloc(2 * PS) for _ in range(6)]

            def work(dst, trial=trial, keys=keys, src=src, want=want):
                if be.batch_set_v1(keys, src) != [True, True]:
                    misses.append((trial, "set"))
                elif be.batch_get_v1(keys, dst) != [True, True]:
                    misses.append((trial, "get"))
                elif page_bytes(pool, dst) != want:
                    wrong.append(trial)

            threads = [threading.Thread(target=work, args=(d,)) for d in dsts]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            for idx in [src, *dsts]:
                pool.free(idx)
        assert wrong == [], f"WRONG BYTES read in trials {wrong}"
        assert misses == [], f"a page its writer was told was stored read as a miss: {misses[:5]}"
    finally:
        be.close()


def test_two_processes_share_pages(master, tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    extra = json.dumps(master.extra())
    keys, done = str(tmp_path / "keys.json"), str(tmp_path / "done")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    w = subprocess.Popen(
        [sys.executable, str(script), "writer", extra, keys, done],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        r = subprocess.run(
            [sys.executable, str(script), "reader", extra, keys, done],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        Path(done).touch()  # the writer stays up until the reader is done, even one that failed
        w_out, w_err = w.communicate(timeout=60)
    assert w.returncode == 0 and r.returncode == 0, (w_err[-2000:], r.stderr[-2000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"ok": [True] * 4, "same": True}


def test_master_killed_mid_run_cache_keeps_serving(master):
    """Misses while the master is gone, bounded time, no wrong bytes; service resumes after it returns."""
    from hicache_core.cache import build_cache
    from hicache_core.keys import hash_chain

    cfg = HiCacheConfig(
        page_size=PS,
        hicache_mem_layout="page_first_direct",
        hicache_io_backend="direct",
        hicache_storage_backend="mooncake",
        hicache_storage_prefetch_policy="timeout",
        hicache_storage_backend_extra_config={**master.extra(), "prefetch_threshold": PS, "prefetch_timeout_base": 2},
        model_name=uuid.uuid4().hex,
    )
    cache = build_cache(cfg, SPEC, 8 * PS, device="cpu", host_tokens=16 * PS, pin_memory=False)
    dev, backend = cache.device_pool, cache.storage
    tokens = list(range(4 * PS))
    prompt = tokens + [7]  # one token past the pages: whole pages are servable

    def admit(rid):
        t0 = time.monotonic()
        while (adm := cache.admit(rid, prompt)).status == "wait":
            cache.poll()
            time.sleep(0.01)
            assert time.monotonic() - t0 < 30, "a dead master hung the cache"
        assert adm.ready
        return adm

    def compute(adm, kv):
        """The engine's prefill: write the KV of every position not served from cache."""
        slots = adm.slots(len(prompt) - len(adm.prefix))
        dev.kv_buffer[:, :, slots[len(adm.prefix) : len(tokens)]] = kv[:, :, len(adm.prefix) :]
        cache.release(adm, prompt, len(prompt) - len(adm.prefix))

    kv = torch.randint(0, 256, dev.kv_buffer[:, :, : len(tokens)].view(torch.uint8).shape, dtype=torch.uint8)
    kv = kv.view(dev.kv_buffer.dtype)
    compute(admit("w"), kv)
    cache.flush()
    assert backend.batch_exists(hash_chain(tokens, PS)) == 4
    cache.evict(10**6)
    cache.evict_host(10**6)
    master.stop()
    t0 = time.monotonic()
    adm = admit("r")
    assert len(adm.prefix) == 0  # nothing fetched, nothing wrong
    compute(adm, kv)
    cache.flush()
    assert time.monotonic() - t0 < 30
    master.start()
    wait_healthy(backend)
    # the store restarted empty: write again (the pages are still on device), then read back whole
    cache.evict(10**6)
    cache.evict_host(10**6)
    compute(admit("w2"), kv)
    cache.flush()
    cache.evict(10**6)
    cache.evict_host(10**6)
    adm = admit("r2")
    assert adm.cached["storage"] == len(tokens)
    cache.ready_to_load_host_cache()
    dev.wait_layer(SPEC.layer_num - 1)
    assert torch.equal(dev.kv_buffer[:, :, adm.prefix].view(torch.uint8), kv.view(torch.uint8))
    assert backend.get_stats()["errors"] >= 1
    cache.release(adm, prompt, 0)
    cache.flush()
    cache.close()


def test_bench_storage_against_raw_client(master, capsys):
    from hicache_core.cli import main

    rc = main(
        [
            "bench",
            "storage",
            "--hicache-storage-backend",
            "mooncake",
            "--hicache-storage-backend-extra-config",
            json.dumps(master.extra(global_segment_size="256mb")),
            "--total-mib",
            "8",
            "--page-kib",
            "256",
            "--repeat",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "raw Mooncake client" in out


CLI_CASES = [
    ("mooncake bad address", backend_check("mooncake", {"master_server_address": "nohost"}), "is not host:port"),
    (
        "mooncake unknown key",
        backend_check("mooncake", {"master_server_address": "127.0.0.1:9", "colour": 1}),
        "unknown key 'colour'",
    ),
    (
        "mooncake protocol",
        backend_check("mooncake", {"master_server_address": "127.0.0.1:9", "protocol": "udp"}),
        "choose one of tcp, rdma",
    ),
    (
        "mooncake timeout as a string",
        backend_check("mooncake", {"master_server_address": "127.0.0.1:9", "connect_timeout_s": "nan"}),
        "connect_timeout_s='nan' is a string; write a number as a JSON number",
    ),
    (
        "mooncake segment text",
        backend_check("mooncake", {"master_server_address": "127.0.0.1:9", "global_segment_size": "big"}),
        "is not a size",
    ),
]


@pytest.mark.parametrize("argv, expected", [(c[1], c[2]) for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_malformed_cli_input_is_one_clear_error(argv, expected, tmp_path, capsys):
    from hicache_core.cli import main
    from hicache_core.testing.cli import assert_clear_cli_error

    assert_clear_cli_error(main, [a.replace("{tmp}", str(tmp_path)) for a in argv], expected, capsys)


def test_mooncake_backend_certifies(master, capsys):
    from hicache_core.cli import main

    rc = main(
        [
            "certify",
            "--hicache-storage-backend",
            "mooncake",
            "--hicache-storage-backend-extra-config",
            json.dumps(master.extra()),
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["rows"]}
    assert rc == 0 and report["passed"], [r for r in report["rows"] if r["outcome"] == "FAILED"]
    assert rows["none"]["outcome"] == "passed" and "wrong KV 0, leaked pages 0" in rows["hang"]["detail"]
    # pages live in the client's segment and carry no checksum; failing writes needs the master stopped
    assert {n for n, r in rows.items() if r["outcome"] == "n/a"} >= {"corrupt", "test_failed_write_is_not_visible"}


def test_extra_config_refuses_strings_for_booleans_and_numbers():
    from hicache_core.storage.options import string_holes

    assert string_holes(MooncakeStoreConfig) == []
    with pytest.raises(ConfigError, match=r"check_server='false' is not a boolean"):
        MooncakeStoreConfig.load({"master_server_address": "127.0.0.1:1", "check_server": "false"})
    with pytest.raises(ConfigError, match=r"connect_timeout_s='5' is a string"):
        MooncakeStoreConfig.load({"master_server_address": "127.0.0.1:1", "connect_timeout_s": "5"})


def test_codec_pages_are_one_object_each_and_a_second_put_of_one_still_counts(master):
    """With "codec" a page is one object ``..._z`` of its encoded length (blobs.py); a batch holding a key the master
    already has is stored key by key, the existing one counting as stored, and every page reads back exact."""
    from hicache_core.registry import open_backend, resolve_config
    from hicache_core.testing.codec import kv_like

    extra = {**master.extra(), "codec": "zstd", "codec_when": "always"}
    cfg = HiCacheConfig(
        page_size=PS,
        hicache_mem_layout="page_first_direct",
        model_name="mc-codec",
        hicache_storage_backend="mooncake",
        hicache_storage_backend_extra_config=extra,
    )
    cfg, resolved = resolve_config(cfg)
    handle, pool = open_backend(cfg, SPEC, 16 * PS, resolved=resolved)
    try:
        src, dst = pool.alloc(4 * PS), pool.alloc(4 * PS)
        kv_like(pool, src)
        keys = random_keys(4, PS)
        assert handle.batch_set_v1(keys[:2], src[: 2 * PS]) == [True, True]
        assert handle.batch_set_v1(keys, src) == [True] * 4  # two of them already stored
        assert handle.batch_exists(keys) == 4
        assert handle.batch_get_v1(keys, dst) == [True] * 4
        assert page_bytes(pool, dst) == page_bytes(pool, src)
        assert handle.raw.parts == ("_z",)
        stats = handle.get_stats()
        assert stats["bytes_written"] < 6 * pool.page_bytes and stats["codec"]["ratio"] > 1.05
    finally:
        handle.close()
