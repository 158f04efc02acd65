"""Who may write the file store: per-user default directory, refused foreign directories, signed pages; its
config schema; crash leftovers; one capacity for every process on a directory."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.memory import HostPool, KVSpec
from hicache_core.registry import make_storage_config
from hicache_core.storage import HEADER_BYTES
from hicache_core.testing import fill_random, page_bytes, random_keys
from hicache_plugin_file import FileStorage
from hicache_plugin_file.directory import default_root

SPEC = KVSpec(layer_num=2, head_num=2, head_dim=8, dtype=torch.bfloat16)
PS = 4
PAGE_FILE = HEADER_BYTES + SPEC.page_bytes(PS)


def make(extra, model="m"):
    pool = HostPool(SPEC, 32 * PS, PS, "page_first_direct", pin_memory=False)
    cfg = HiCacheConfig(page_size=PS, hicache_mem_layout="page_first_direct", model_name=model)
    be = FileStorage(make_storage_config(cfg, SPEC), extra)
    be.register_mem_pool_host(pool)
    return be, pool


def write(be, pool, keys):
    src = pool.alloc(len(keys) * PS)
    fill_random(pool, src)
    assert be.batch_set_v1(keys, src) == [True] * len(keys)
    return src


def test_default_directory_is_per_user_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_root() == f"/tmp/hicache-{os.geteuid()}"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    be, _ = make({})
    assert be.root == str(tmp_path / "xdg" / "hicache")
    assert os.stat(be.root).st_mode & 0o777 == 0o700
    be.close()


def test_a_directory_others_can_write_is_refused_unless_shared(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(ConfigError, match="writable by group and others .*chmod 700.*shared"):
        make({"storage_dir": str(d)})
    os.chmod(d, 0o775)
    with pytest.raises(ConfigError, match="writable by its group"):
        make({"storage_dir": str(d)})
    be, _ = make({"storage_dir": str(d), "shared": True})
    be.close()


def test_a_directory_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user (CI runs as root)")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, 4242)
    with pytest.raises(ConfigError, match="belongs to uid 4242, not to you"):
        make({"storage_dir": str(d)})


def test_pages_from_writers_without_the_mac_key_are_misses(tmp_path, monkeypatch):
    d = str(tmp_path / "s")
    keys = random_keys(3, PS)
    mallory, mpool = make({"storage_dir": d})  # can write the directory, has no key
    write(mallory, mpool, keys[:1])
    other_key, opool = make({"storage_dir": d, "mac_key": "not-the-key"})
    write(other_key, opool, keys[1:2])
    alice, apool = make({"storage_dir": d, "mac_key": "s3cret"})
    src = write(alice, apool, keys[2:])  # a good page next to the planted ones
    dst = apool.alloc(3 * PS)
    assert alice.batch_get_v1(keys, dst) == [False, False, True]
    assert page_bytes(apool, dst[2 * PS :]) == page_bytes(apool, src)
    st = alice.get_stats()
    assert st["unsigned"] == 1 and st["forged"] == 1
    # the key from the environment works the same; a reader without a key refuses signed pages
    monkeypatch.setenv("HICACHE_FILE_MAC_KEY", "s3cret")
    bob, bpool = make({"storage_dir": d})
    assert bob.batch_get_v1(keys[2:], bpool.alloc(PS)) == [True]
    monkeypatch.delenv("HICACHE_FILE_MAC_KEY")
    eve, epool = make({"storage_dir": d})
    write(eve, epool, keys[2:])  # exists: skipped, the signed page stays
    assert eve.batch_get_v1(keys[2:], epool.alloc(PS)) == [False]


def test_mac_covers_every_byte(tmp_path):
    be, pool = make({"storage_dir": str(tmp_path), "mac_key": "k"})
    keys = random_keys(1, PS)
    write(be, pool, keys)
    path = be._path(keys[0])
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 1
    # an attacker who also fixes the XXH3 field still fails the MAC
    import struct

    import xxhash

    data[24:32] = struct.pack("<Q", xxhash.xxh3_64(bytes(data[HEADER_BYTES:])).intdigest())
    Path(path).write_bytes(bytes(data))
    assert be.batch_get_v1(keys, pool.alloc(PS)) == [False]
    assert be.get_stats()["forged"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"storag_dir": "/x"}, r"unknown key 'storag_dir' \(did you mean 'storage_dir'\?\).*known keys: storage_dir"),
        ({"storage_dir": 12345}, "storage_dir=12345 must be a non-empty string"),
        ({"capacity_bytes": -5}, "capacity_bytes=-5 must be >= 0"),
        ({"io_threads": 0}, "io_threads=0 must be a whole number >= 1"),
        ({"fsync": "fals"}, "fsync='fals' is not a boolean"),
        ({"layout_compat": "sglng"}, "layout_compat='sglng'; choose one of hicache, sglang"),
        ({"mac_key": ""}, "mac_key='' must be a non-empty string"),
    ],
)
def test_extra_config_schema_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        make({"storage_dir": str(tmp_path), **extra})


def test_fsync_string_is_refused_and_dynamic_loader_keys_pass(tmp_path):
    # "false" in quotes is a string, which once read as true elsewhere: refused, never guessed at
    with pytest.raises(ConfigError, match=r"fsync='false' is not a boolean; write JSON true or false"):
        make({"storage_dir": str(tmp_path), "fsync": "false"})
    be, _ = make({"storage_dir": str(tmp_path), "fsync": False, "backend_name": "x", "interface_v1": 1})
    assert be.fsync is False


def test_temporary_files_of_dead_writers_are_removed_at_start(tmp_path):
    be, pool = make({"storage_dir": str(tmp_path)})
    keys = random_keys(1, PS)
    write(be, pool, keys)
    page_dir = os.path.dirname(be._path(keys[0]))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = os.path.join(page_dir, f"{'a' * 64}.page.{dead.stdout.strip()}.1.deadbeef.tmp")
    live = os.path.join(page_dir, f"{'b' * 64}.page.{os.getpid()}.1.cafe0000.tmp")
    for p in (orphan, live):
        Path(p).write_bytes(b"half a page")
    again, _ = make({"storage_dir": str(tmp_path)})
    assert not os.path.exists(orphan) and os.path.exists(live)
    assert again.get_stats()["orphans_removed"] == 1


CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from test_file_trust import make, random_keys, write, PS
    be, pool = make({"storage_dir": sys.argv[1], "capacity_bytes": int(sys.argv[3]), "io_threads": 1}, model="child")
    write(be, pool, random_keys(3, PS))
    print(be.get_stats()["used_bytes"])
""")


def test_capacity_holds_for_the_directory_across_processes(tmp_path):
    d = str(tmp_path / "s")
    cap = 4 * PAGE_FILE
    a, apool = make({"storage_dir": d, "capacity_bytes": cap, "io_threads": 1})
    write(a, apool, random_keys(3, PS))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, d, os.path.dirname(__file__), str(cap)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout.split()[-1]) <= cap
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs if f.endswith(".page"))
    assert on_disk <= cap, f"{on_disk} bytes of pages with a {cap}-byte limit for the directory"
    write(a, apool, random_keys(2, PS))  # this process now evicts pages the child wrote, too
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs if f.endswith(".page"))
    assert on_disk <= cap and a.get_stats()["used_bytes"] == on_disk


def test_file_backend_certifies(tmp_path, capsys, monkeypatch):
    import json

    from hicache_core.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "certify",
            "--hicache-storage-backend",
            "file",
            "--hicache-storage-backend-extra-config",
            json.dumps({"storage_dir": "{tmp}"}),
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    failed = [r for r in report["rows"] if r["outcome"] != "passed"]
    assert rc == 0 and report["passed"], failed
    assert [r["name"] for r in failed] == ["test_unserved_layout_is_refused"]  # it serves every layout
    corrupt = next(r for r in report["rows"] if r["name"] == "corrupt")
    assert "wrong KV 0" in corrupt["detail"]
    assert os.listdir(tmp_path) == [], "{tmp} must become temporary directories, removed afterwards"


def test_a_process_starting_on_the_directory_keeps_anothers_namespace_file(tmp_path, monkeypatch):
    """Two ranks starting at once on one directory: the second's start-up scan ran between the first writing its
    namespace.json's temporary file and publishing it, took it for a crashed writer's, and the first failed
    ("No such file or directory"). The temporary file now carries its writer's pid like a page's does."""
    import hicache_plugin_file.store as store

    real_replace = os.replace
    started = []

    def replace_after_another_start(src, dst):
        if dst.endswith("namespace.json") and not started:
            started.append("other")
            make({"storage_dir": str(tmp_path)}, model="other")  # another process's start-up scan runs now
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", replace_after_another_start)
    be, pool = make({"storage_dir": str(tmp_path)})
    write(be, pool, random_keys(2))
    assert started and be.batch_exists(random_keys(1)) == 0


def test_the_usage_counter_loses_no_update_between_threads(tmp_path):
    import threading

    from hicache_plugin_file.directory import SharedUsage

    usage, other = SharedUsage(str(tmp_path)), SharedUsage(str(tmp_path))  # another process's descriptor too
    usage.set(10_000)

    def churn(u, n):
        for _ in range(n):
            u.add(3)
            u.add(-1)

    threads = [threading.Thread(target=churn, args=(usage if i % 2 else other, 400)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert usage.value() == 10_000 + 8 * 400 * 2
    usage.close()
    other.close()
