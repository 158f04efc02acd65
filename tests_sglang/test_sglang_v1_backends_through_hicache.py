"""SGLang's own v1 storage backends, loaded by ``--hicache-storage-backend dynamic`` and driven by hicache's controller
on hicache's host pool: ``MooncakeStore`` against a real ``mooncake_master`` on loopback, and ``HiCacheHF3FS`` on
plain files (through SGLang's ``Hf3fsMockClient``, its own file-backed client: 3FS's usrbio client does not build
here). Each passes ``hicache check`` (bytes identical) and runs the multi-turn benchmark with storage hits and the
no-cache run's tokens; the pages hicache's pool wrote read byte for byte into SGLang's REAL host pool through the
same SGLang class.

Found here: SGLang's backends call ``get_ksize_per_token()`` / ``get_size_per_token()`` on the host pool, which
hicache's pool lacked (the MooncakeStore refused it at registration); ``HiCacheHF3FS`` is built by SGLang's factory
through ``from_env_config``, not its constructor; and SGLang 0.5.23's ``HiCacheHF3FS.batch_set_v1`` answers two
bools per page on an MHA page-first pool (one per K and V object), which hicache's guard rightly refused as the
wrong length until the bridge folded them as SGLang's own ``batch_get_v1`` does.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from real_pools import real_host_pool, spec_of
from sglang_helpers import storage_config

from hicache_core.bench import multiturn
from hicache_core.cli import main
from hicache_core.config import HiCacheConfig
from hicache_core.memory import HostPool
from hicache_core.registry import create_backend, make_storage_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_engine import SMALL, parse  # noqa: E402

PS = 4
MOONCAKE = {
    "backend_name": "sglang-mooncake",
    "module_path": "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store",
    "class_name": "MooncakeStore",
    "interface_v1": 1,
}
HF3FS = {
    "backend_name": "sglang-hf3fs",
    "module_path": "sglang.srt.mem_cache.storage.hf3fs.storage_hf3fs",
    "class_name": "HiCacheHF3FS",
    "interface_v1": 1,
    "use_mock_hf3fs_client": True,
}


def mooncake_extra(master) -> dict:
    """SGLang's MooncakeStore keys (sizes as integers: it refuses '64mb'), our master's addresses."""
    return {
        **MOONCAKE,
        "master_server_address": master.address,
        "metadata_server": master.metadata,
        "protocol": "tcp",
        "local_hostname": "127.0.0.1",
        "global_segment_size": 64 << 20,
        "local_buffer_size": 16 << 20,
        "check_server": False,
        "master_metrics_port": master.metrics_port,
    }


@pytest.fixture
def hf3fs_env(tmp_path, monkeypatch):
    """SGLang's way to configure HiCacheHF3FS: a JSON file named by SGLANG_HICACHE_HF3FS_CONFIG_PATH."""
    cfg = tmp_path / "hf3fs.json"
    cfg.write_text(
        json.dumps(
            {"file_path_prefix": str(tmp_path / "3fs" / "kv"), "file_size": 64 << 20, "numjobs": 2, "entries": 8}
        )
    )
    monkeypatch.setenv("SGLANG_HICACHE_HF3FS_CONFIG_PATH", str(cfg))
    return tmp_path / "3fs"


def extra_for(name: str, master) -> dict:
    return mooncake_extra(master) if name == "mooncake" else dict(HF3FS)


@pytest.mark.parametrize("layout", ["page_first_direct", "layer_first"])
@pytest.mark.parametrize("name", ["mooncake", "hf3fs"])
def test_sglang_v1_backends_pass_hicache_check(name, layout, master, hf3fs_env, capsys):
    rc = main(
        [
            "check",
            "--hicache-io-backend",
            "direct",
            "--hicache-mem-layout",
            layout,
            "--hicache-storage-backend",
            "dynamic",
            "--hicache-storage-backend-extra-config",
            json.dumps(extra_for(name, master)),
        ]
    )
    out = capsys.readouterr().out
    if name == "mooncake" and layout == "layer_first":  # SGLang's MooncakeStore refuses MHA layer_first itself
        assert rc == 1 and "Use page_first/page_first_direct for MHA" in out and "check FAILED" in out, out
        return
    assert rc == 0 and "(v1)" in out and "set    4/4" in out and "bytes identical" in out and "check passed" in out, out


@pytest.mark.parametrize("name", ["mooncake", "hf3fs"])
def test_sglang_v1_backends_run_the_multiturn_benchmark_through_hicache(tmp_path, name, master, hf3fs_env):
    extra = {**extra_for(name, master), "prefetch_threshold": 16}
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
            "1",
            "--hicache-mem-layout",
            "page_first_direct",
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
    assert run["backuped_tokens"] > 0 and run["hit_tokens"]["storage"] > 0 and run["storage_errors"] == {}, run


@pytest.mark.parametrize("name", ["mooncake", "hf3fs"])
def test_pages_hicache_wrote_read_right_into_sglangs_real_pool(name, master, hf3fs_env):
    """Written from hicache's HostPool through hicache's registry and guard; read by the same SGLang class
    registered with SGLang's real MHATokenToKVPoolHost of the same geometry and layout."""
    extra = extra_for(name, master)
    config = HiCacheConfig(
        page_size=PS,
        hicache_mem_layout="page_first_direct",
        hicache_io_backend="direct",
        hicache_storage_backend="dynamic",
        hicache_storage_backend_extra_config=extra,
    )
    ours = HostPool(spec_of(False), 64, PS, "page_first_direct", pin_memory=False)
    ours.raw.copy_(torch.randint(0, 256, ours.raw.shape, dtype=torch.uint8))
    sc = make_storage_config(config, spec_of(False))
    handle = create_backend("dynamic", sc, ours)
    keys = [os.urandom(16).hex() for _ in range(6)]
    src = torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in (5, 0, 9, 2, 14, 7)])
    assert handle.batch_set_v1(keys, src) == [True] * 6

    theirs = real_host_pool("page_first_direct")
    sglang_cls = type(handle.raw.inner) if name == "hf3fs" else type(handle.raw)
    ssc = storage_config(extra, model=sc.model_name, layout="page_first_direct")
    if name == "hf3fs":
        from hicache_core.storage.foreign import sglang_page_bytes

        reader = sglang_cls.from_env_config(sglang_page_bytes(theirs), theirs.dtype, ssc)
        reader.metadata_client = (
            handle.raw.inner.metadata_client
        )  # SGLang's local metadata lives in the writer's process
    else:
        reader = sglang_cls(ssc, theirs)
    reader.register_mem_pool_host(theirs)
    dst = torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in (3, 11, 1, 8, 4, 12)])
    got = reader.batch_get_v1(sc.namespace.keys(keys), dst)  # the keys as hicache's namespace sent them
    assert list(got[:6]) == [True] * 6, got
    for i in range(6):
        want = ours.get_data_page(int(src[i * PS])).view(torch.uint8)
        assert torch.equal(theirs.get_data_page(int(dst[i * PS]), flat=True).contiguous().view(torch.uint8), want), i
    handle.close()
