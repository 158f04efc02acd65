"""SGLang's own backends inside hicache, and one L3 directory for both.

- SGLang's ``HiCacheFile`` (v0) loads by ``dynamic`` JSON, built as SGLang's factory builds it (its
  ``HiCacheStorageConfig``, its constructor shape), runs ``hicache check`` and the multi-turn benchmark through
  hicache's controller with the no-cache tokens.
- With ``"layout_compat": "sglang"``, hicache's ``file`` backend reads the pages SGLang's ``HiCacheFile`` wrote,
  and SGLang's ``HiCacheFile`` reads hicache's.

SGLang's own backends here run on hicache's ``HostPool`` (they are hicache's backends in these tests, so hicache's
pool is the real part); SGLang's real host pools are tested in ``test_sglang_real_pools.py``.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheFile
from sglang_helpers import PS, random_pages, same, storage_config

from hicache_core.bench import multiturn
from hicache_core.cli import main
from hicache_core.config import HiCacheConfig
from hicache_core.memory import HostPool, KVSpec
from hicache_core.registry import create_backend, make_storage_config

SPEC = KVSpec(layer_num=3, head_num=2, head_dim=8, dtype=torch.bfloat16)
MLA = KVSpec(layer_num=3, head_num=1, head_dim=24, dtype=torch.bfloat16, is_mla=True)


def sglang_file(path, *, layout, model="org/model-7b", mla=False, tp_rank=0, tp_size=1) -> HiCacheFile:
    sc = storage_config(
        {"file_storage_path": str(path)}, model=model, layout=layout, mla=mla, tp_rank=tp_rank, tp_size=tp_size
    )
    return HiCacheFile(sc)


def hicache_file(path, pool, *, model="org/model-7b", tp_rank=0, tp_size=1):
    cfg = HiCacheConfig(
        page_size=PS,
        hicache_mem_layout=pool.layout,
        model_name=model,
        hicache_storage_backend_extra_config={"storage_dir": str(path), "layout_compat": "sglang"},
    )
    sc = make_storage_config(cfg, pool.spec, tp_rank=tp_rank, tp_size=tp_size)
    return create_backend("file", sc, pool)


@pytest.mark.parametrize("spec", [SPEC, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_one_directory_for_sglang_and_hicache(tmp_path, layout, spec):
    pool = HostPool(spec, 16 * PS, PS, layout, pin_memory=False)
    theirs = sglang_file(tmp_path, layout=layout, mla=spec.is_mla)
    ours = hicache_file(tmp_path, pool)
    keys = [os.urandom(32).hex() for _ in range(4)]
    # SGLang writes (as its controller does: flat pages from get_data_page), hicache reads
    src = pool.alloc(2 * PS)
    pages = random_pages(pool, src)
    assert theirs.batch_set(keys[:2], [pool.get_data_page(int(src[i * PS]), flat=True) for i in range(2)])
    assert ours.batch_exists(keys[:2]) == 2
    dst = pool.alloc(2 * PS)
    assert ours.batch_get_v1(keys[:2], dst) == [True, True]
    assert all(same(pool.get_data_page(int(dst[i * PS]), flat=True), pages[i]) for i in range(2))
    # hicache writes, SGLang reads
    src2 = pool.alloc(2 * PS)
    pages2 = random_pages(pool, src2)
    assert ours.batch_set_v1(keys[2:], src2) == [True, True]
    for i, key in enumerate(keys[2:]):
        assert theirs.exists(key)
        got = theirs.get(key, pool.get_dummy_flat_data_page())
        assert got is not None and same(got, pages2[i])
    # the file names are SGLang's: key + model/tp suffix (MLA: no rank)
    suffix = "_org-model-7b" if spec.is_mla else "_org-model-7b_0_1"
    assert sorted(os.listdir(tmp_path)) == sorted(f"{k}{suffix}.bin" for k in keys)
    ours.close()


def test_another_model_or_rank_sees_nothing(tmp_path):
    pool = HostPool(SPEC, 8 * PS, PS, "layer_first", pin_memory=False)
    theirs = sglang_file(tmp_path, layout="layer_first")
    key = os.urandom(32).hex()
    src = pool.alloc(PS)
    random_pages(pool, src)
    assert theirs.set(key, pool.get_data_page(int(src[0]), flat=True))
    assert hicache_file(tmp_path, pool, model="other/model").batch_exists([key]) == 0
    assert hicache_file(tmp_path, pool, tp_rank=1, tp_size=2).batch_exists([key]) == 0
    assert hicache_file(tmp_path, pool).batch_exists([key]) == 1


def test_a_file_of_the_wrong_size_is_a_miss(tmp_path):
    pool = HostPool(SPEC, 8 * PS, PS, "layer_first", pin_memory=False)
    ours = hicache_file(tmp_path, pool)
    key = os.urandom(32).hex()
    (tmp_path / f"{key}_org-model-7b_0_1.bin").write_bytes(b"\0" * 100)  # a page of another shape
    assert ours.batch_get_v1([key], pool.alloc(PS)) == [False]
    assert ours.get_stats()["wrong_size"] == 1


def test_unknown_layout_compat_is_refused(tmp_path):
    from hicache_core.errors import ConfigError

    with pytest.raises(ConfigError, match="layout_compat='sglang2'; choose one of hicache, sglang"):
        create_backend(
            "file",
            make_storage_config(HiCacheConfig(page_size=PS), SPEC),
            HostPool(SPEC, 8 * PS, PS, "layer_first", pin_memory=False),
            extra_config={"layout_compat": "sglang2", "storage_dir": str(tmp_path)},
        )


SGLANG_FILE = {
    "backend_name": "sglang-file",
    "module_path": "sglang.srt.mem_cache.hicache_storage",
    "class_name": "HiCacheFile",
    "interface_v1": 0,
}


def test_sglang_hicache_file_passes_hicache_check(tmp_path, capsys):
    rc = main(
        [
            "check",
            "--hicache-io-backend",
            "direct",
            "--hicache-storage-backend",
            "dynamic",
            "--hicache-storage-backend-extra-config",
            json.dumps({**SGLANG_FILE, "file_storage_path": str(tmp_path)}),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "v0 via adapter" in out and "bytes identical" in out and "check passed" in out
    assert os.listdir(tmp_path) == []  # the check removed its pages


def test_sglang_hicache_file_runs_the_multiturn_benchmark(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
    from test_engine import SMALL, parse

    extra = {**SGLANG_FILE, "file_storage_path": str(tmp_path / "store"), "prefetch_threshold": 16}
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
            json.dumps(extra),
        ]
    )
    assert multiturn.run(args) == 0  # tokens identical to no-cache
    run = {c["config"]: c for c in json.loads(Path(tmp_path / "r" / "report.json").read_text())["configs"]}[
        "hicache+storage"
    ]
    assert run["backuped_tokens"] > 0 and run["hit_tokens"]["storage"] > 0


def test_an_sglang_v1_class_is_built_as_sglang_builds_it_and_checked(tmp_path, capsys):
    """SimHiCacheStorage is SGLang's v1 benchmark store: built as SGLang's factory builds it (cls(config)), it takes
    the v1 path; it keeps keys only and serves no bytes by design, and hicache check says so (exit 1) --
    nothing it returns would be served as KV. (SGLang's own MooncakeStore and HiCacheHF3FS through hicache's
    controller are not tested yet.)"""
    extra = {
        "backend_name": "sim",
        "module_path": "sglang.srt.mem_cache.storage.sim_storage",
        "class_name": "SimHiCacheStorage",
        "interface_v1": 1,
        "sim_write_gbps": 0,
        "sim_op_latency_us": 0,
    }
    rc = main(
        [
            "check",
            "--hicache-io-backend",
            "direct",
            "--hicache-storage-backend",
            "dynamic",
            "--hicache-storage-backend-extra-config",
            json.dumps(extra),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1 and "(v1)" in out and "exists 4/4" in out and "bytes DIFFER" in out and "check FAILED" in out
