"""The file backend: conformance kit in every layout, corruption on disk, two processes, capacity, config."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.memory import HostPool, KVSpec
from hicache_core.registry import create_backend, make_storage_config
from hicache_core.storage import HEADER_BYTES
from hicache_core.testing import BackendConformance, fill_random, page_bytes, random_keys
from hicache_plugin_file import FileStorage


class TestFileConformance(BackendConformance):
    backend_name = "file"

    def extra_config(self, tmp_path):
        return {"storage_dir": str(tmp_path / "store")}


SPEC = KVSpec(layer_num=2, head_num=2, head_dim=8, dtype=torch.bfloat16)
PS = 4


def make(tmp_path, layout="page_first_direct", **extra):
    pool = HostPool(SPEC, 32 * PS, PS, layout, pin_memory=False)
    cfg = HiCacheConfig(page_size=PS, hicache_mem_layout=layout, model_name="m")
    be = FileStorage(make_storage_config(cfg, SPEC), {"storage_dir": str(tmp_path), **extra})
    be.register_mem_pool_host(pool)
    return be, pool


def written(tmp_path, n=3, **extra):
    be, pool = make(tmp_path, **extra)
    src = pool.alloc(n * PS)
    fill_random(pool, src)
    keys = random_keys(n, PS)
    assert be.batch_set_v1(keys, src) == [True] * n
    return be, pool, keys, src


def test_file_format_says_what_it_is(tmp_path):
    be, pool, keys, src = written(tmp_path, 1)
    path = be._path(keys[0])
    data = Path(path).read_bytes()
    assert data[:8] == b"HICPAGE\0" and be.envelope.key_digest(keys[0]) in data[:HEADER_BYTES]
    assert len(data) == HEADER_BYTES + pool.page_bytes
    assert data[HEADER_BYTES:] == page_bytes(pool, src)[0]
    assert os.path.exists(os.path.join(be.dir, "namespace.json"))


@pytest.mark.parametrize(
    "damage, kind",
    [
        ("truncate", "truncated"),
        ("truncate_header", "truncated"),
        ("flip_payload", "corrupt"),
        ("flip_header", "foreign"),
        ("swap", "foreign"),
        ("foreign", "foreign"),
        ("append", "foreign"),
    ],
)
def test_damaged_files_are_misses_never_data(tmp_path, damage, kind):
    be, pool, keys, src = written(tmp_path, 2)
    path, other = be._path(keys[0]), be._path(keys[1])
    raw = bytearray(Path(path).read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 7]
    elif damage == "truncate_header":
        raw = raw[:50]
    elif damage == "flip_payload":
        raw[HEADER_BYTES + len(raw) // 3] ^= 0x10
    elif damage == "flip_header":
        raw[40] ^= 0x01  # inside the key-and-namespace digest
    elif damage == "swap":
        raw = bytearray(Path(other).read_bytes())
    elif damage == "foreign":
        raw = bytearray(os.urandom(len(raw)))
    elif damage == "append":
        raw += b"x"
    Path(path).write_bytes(bytes(raw))
    dst = pool.alloc(2 * PS)
    assert be.batch_get_v1(keys, dst) == [False, True]
    assert page_bytes(pool, dst[PS:]) == page_bytes(pool, src[PS:])
    assert be.get_stats()[kind] == 1
    assert not os.path.exists(path)  # removed, so it can be written again
    assert be.batch_set_v1(keys[:1], src[:PS]) == [True]
    assert be.batch_get_v1(keys[:1], dst[:PS]) == [True]


def test_half_written_temp_files_are_invisible(tmp_path):
    be, pool, keys, src = written(tmp_path, 1)
    ghost = random_keys(1, PS)[0]
    os.makedirs(os.path.dirname(be._path(ghost)), exist_ok=True)
    with open(be._path(ghost) + ".123.456.abcd.tmp", "wb") as f:
        f.write(b"HICPAGE\0" + b"\0" * 100)  # a writer that died mid-page
    assert be.batch_exists([ghost]) == 0
    assert be.batch_get_v1([ghost], pool.alloc(PS)) == [False]


def test_v0_and_layouts_share_the_directory(tmp_path):
    """layer_first and page_first_direct have the same page bytes, so they share pages; page_first does not."""
    be_lf, pool_lf, keys, src = written(tmp_path, 2)
    be_pfd, pool_pfd = make(tmp_path, "layer_first")
    dst = pool_pfd.alloc(2 * PS)
    assert be_pfd.batch_get_v1(keys, dst) == [True, True]
    assert page_bytes(pool_pfd, dst) == page_bytes(pool_lf, src)
    be_pf, pool_pf = make(tmp_path, "page_first")
    assert be_pf.batch_exists(keys) == 0


def test_capacity_evicts_least_recently_used_pages(tmp_path):
    page_file = HEADER_BYTES + SPEC.page_bytes(PS)
    be, pool = make(tmp_path, capacity_bytes=3 * page_file, io_threads=1)  # one writer: a known LRU order
    src = pool.alloc(5 * PS)
    fill_random(pool, src)
    keys = random_keys(5, PS)
    assert be.batch_set_v1(keys[:3], src[: 3 * PS]) == [True] * 3
    assert be.batch_get_v1(keys[:1], pool.alloc(PS)) == [True]  # key 0 is now the most recent
    assert be.batch_set_v1(keys[3:4], src[3 * PS : 4 * PS]) == [True]
    assert [be.exists(k) for k in keys[:4]] == [True, False, True, True]
    st = be.get_stats()
    assert st["evicted_pages"] == 1 and st["used_bytes"] <= 3 * page_file
    # a new instance learns what is on disk and keeps the limit
    be2, _ = make(tmp_path, capacity_bytes=3 * page_file)
    assert be2.get_stats()["used_bytes"] == 3 * page_file


def test_directory_from_sglang_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", str(tmp_path / "envdir"))
    pool = HostPool(SPEC, 8 * PS, PS, "layer_first", pin_memory=False)
    cfg = HiCacheConfig(page_size=PS)
    handle = create_backend("file", make_storage_config(cfg, SPEC), pool)
    assert handle.raw.root == str(tmp_path / "envdir")
    handle.close()


def test_unusable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot use storage_dir .*writable directory"):
        make(blocker / "sub")
    with pytest.raises(ConfigError, match="capacity_bytes=.lots. is not a size"):
        make(tmp_path, capacity_bytes="lots")


WORKER = textwrap.dedent("""
    import hashlib, os, sys, random, time
    import torch
    from hicache_core.config import HiCacheConfig
    from hicache_core.memory import HostPool, KVSpec
    from hicache_core.registry import make_storage_config
    from hicache_plugin_file import FileStorage

    root, me, other, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    spec = KVSpec(layer_num=4, head_num=4, head_dim=64, dtype=torch.bfloat16)
    PS = 16
    pool = HostPool(spec, 16 * PS, PS, "page_first_direct", pin_memory=False)
    be = FileStorage(make_storage_config(HiCacheConfig(page_size=PS, hicache_mem_layout="page_first_direct"), spec),
                     {"storage_dir": root, "io_threads": 2})
    be.register_mem_pool_host(pool)

    def content(key):  # every page's bytes follow from its key: a reader can tell a whole page from anything else
        out, h = b"", key.encode()
        while len(out) < pool.page_bytes:
            h = hashlib.sha256(h).digest()
            out += h * 64
        return out[: pool.page_bytes]

    def key(proc, i):
        return hashlib.sha256(f"{proc}-{i}".encode()).hexdigest()

    idx = pool.alloc(8 * PS)
    open(os.path.join(root, f"ready{me}"), "w").close()  # start together
    while not os.path.exists(os.path.join(root, f"ready{other}")):
        time.sleep(0.01)
    seen = bad = 0
    rng = random.Random(me)
    for r in range(rounds):
        keys = [key(me, r * 4 + j) for j in range(4)]
        for j, k in enumerate(keys):
            segs = pool.page_memoryviews(idx[j * PS:(j + 1) * PS])[0]
            data, pos = content(k), 0
            for s in segs:
                s[:] = data[pos:pos + len(s)]
                pos += len(s)
        assert all(be.batch_set_v1(keys, idx[: 4 * PS]))
        theirs = [key(other, rng.randrange(0, (r + 1) * 4)) for _ in range(4)]
        ok = be.batch_get_v1(theirs, idx[4 * PS:])
        for j, (k, good) in enumerate(zip(theirs, ok)):
            if good:
                seen += 1
                got = b"".join(bytes(s) for s in pool.page_memoryviews(idx[(4 + j) * PS:(5 + j) * PS])[0])
                bad += got != content(k)
        time.sleep(0.002)
    print(f"seen={seen} bad={bad}")
""")


def test_two_processes_share_a_directory(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = str(tmp_path / "shared")
    os.makedirs(root)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), root, str(me), str(1 - me), "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        seen, bad = (int(x.split("=")[1]) for x in out.split())
        assert bad == 0, "a reader saw bytes that are not a whole page written by the other process"
        assert seen > 20, "the processes did not read each other's pages"
    shutil.rmtree(root)
