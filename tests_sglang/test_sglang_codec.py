"""The L3 codec (``"codec"`` in the extra config) under HiCacheForSGLang on SGLang's REAL host pools, built by their
own constructors: zstd pages round-trip byte-exact through file, memory and mooncake in every layout, for MHA, MLA
and a hybrid's Mamba state slot beside its KV; SGLang's v0 calls (flat pages) read what v1 wrote and the reverse;
fp8 comes back within e4m3's step; a pool fp8 cannot take, and a backend without blob methods, are refused at
registration, naming what and how to fix it.
"""

import pytest
import torch
from real_pools import LAYOUTS, bridge, group, indices, keys, mamba_pool, page_bytes, real_host_pool, store
from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer

from hicache_core.errors import BackendLoadError, ConfigError


def extra_for(name, tmp_path, request, codec: str) -> dict:
    where = (
        {"hicache_backend": "mooncake", **request.getfixturevalue("master").extra()}
        if name == "mooncake"
        else store(name, tmp_path)
    )
    return {**where, "codec": codec, "codec_when": "always"}


def kv_like(pool) -> torch.Tensor:
    """Normal values in the pool's buffer (random bytes do not compress; KV's exponents do); returns them."""
    buf = pool.kv_buffer
    buf.copy_(torch.randn(buf.shape).to(buf.dtype))
    return buf


def flat(pool, host_indices) -> torch.Tensor:
    return torch.cat([pool.get_data_page(int(i), flat=True).float().view(-1) for i in host_indices[:: pool.page_size]])


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend_name", ["file", "memory"])
def test_zstd_pages_round_trip_byte_exact_on_a_real_pool(tmp_path, request, backend_name, layout, mla):
    pool = real_host_pool(layout, mla=mla)
    kv_like(pool)
    b = bridge(pool, extra_for(backend_name, tmp_path, request, "zstd"), mla=mla)
    src, dst = indices([3, 0, 7, 1]), indices([20, 14, 11, 25])
    ks = keys(4)
    assert b.batch_set_v1(ks, src) == [True] * 4
    assert b.batch_exists(ks) == 4
    assert b.batch_get_v1(ks, dst) == [True] * 4
    assert page_bytes(pool, dst) == page_bytes(pool, src)
    codec = b.get_stats()["codec"]
    assert codec["pages_encoded"] == 4 and codec["decode_failed"] == 0 and codec["ratio"] > 1.05
    # v0 reads what v1 wrote, and v1 what v0 wrote: SGLang's flat page, byte for byte, through the codec
    got = b.get(ks[0], pool.get_dummy_flat_data_page())
    assert got is not None and got.contiguous().view(torch.uint8).numpy().tobytes() == page_bytes(pool, src)[0]
    k0 = keys(1)
    assert b.set(k0[0], pool.get_data_page(int(src[4]), flat=True))
    back = indices([30])
    assert b.batch_get_v1(k0, back) == [True]
    assert page_bytes(pool, back) == page_bytes(pool, src)[1:2]
    b.close()


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_zstd_through_mooncake_on_a_real_pool(tmp_path, request, layout):
    pool = real_host_pool(layout)
    kv_like(pool)
    b = bridge(pool, extra_for("mooncake", tmp_path, request, "zstd"), mla=False)
    src, dst = indices([5, 2, 9]), indices([17, 21, 12])
    ks = keys(3)
    assert b.batch_set_v1(ks, src) == [True] * 3
    assert b.batch_get_v1(ks, dst) == [True] * 3
    assert page_bytes(pool, dst) == page_bytes(pool, src)
    assert b.get_stats()["codec"]["pages_encoded"] == 3
    b.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_pages_come_back_within_e4m3s_step_on_a_real_pool(tmp_path, request, layout):
    pool = real_host_pool(layout)
    kv_like(pool)
    b = bridge(pool, extra_for("file", tmp_path, request, "fp8"), mla=False)
    src, dst = indices([4, 6]), indices([10, 13])
    ks = keys(2)
    assert b.batch_set_v1(ks, src) == [True, True]
    assert b.batch_get_v1(ks, dst) == [True, True]
    x, y = flat(pool, src), flat(pool, dst)
    assert not torch.equal(x, y)  # lossy, as asked
    # e4m3's 3 mantissa bits: half a step is 1/16 of a value; values far below their block's largest go subnormal
    assert bool(((x - y).abs() <= x.abs() / 16 + x.abs().max() * 2**-9 + y.abs() * 2**-7).all())
    assert b.get_stats()["codec"]["ratio"] > 1.9
    b.close()


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_a_hybrids_mamba_state_beside_its_kv_through_zstd(tmp_path, request, layout):
    anchor, mamba = real_host_pool(layout), mamba_pool(layout)
    kv_like(anchor)
    for buf in (mamba.temporal_buffer, *mamba.conv_buffer):  # a state's values, not random bytes: they compress
        buf.copy_(torch.randn(buf.shape).to(buf.dtype))
    b = bridge(group(anchor, mamba=mamba), extra_for("file", tmp_path, request, "zstd"), mla=False)
    ks = keys(2)
    assert b.batch_set_v1(ks, indices([1, 2])) == [True, True]
    state = PoolTransfer(name=PoolName("mamba"), keys=ks[-1:], host_indices=torch.tensor([3]))
    assert b.batch_set_v2([state]) == {"mamba": [True]}
    trailing = PoolTransfer(
        name=PoolName("mamba"), keys=ks[-1:], host_indices=None, hit_policy=PoolHitPolicy.TRAILING_PAGES
    )
    assert b.batch_exists_v2(ks, [trailing]).kv_hit_pages == 2
    landing = PoolTransfer(name=PoolName("mamba"), keys=ks[-1:], host_indices=torch.tensor([9]))
    assert b.batch_get_v2([landing]) == {"mamba": [True]}
    slot = [mamba.get_data_page(i, flat=True).contiguous().view(torch.uint8).numpy().tobytes() for i in (3, 9)]
    assert slot[0] == slot[1]
    assert b.batch_get_v1(ks, indices([7, 8])) == [True, True]
    assert page_bytes(anchor, indices([7, 8])) == page_bytes(anchor, indices([1, 2]))
    side = b.side.pools["mamba"].handle.get_stats()["codec"]  # a slot this small (328 bytes) is stored raw
    assert side["name"] == "zstd" and side["pages_encoded"] + side["pages_raw"] == 1
    b.close()


def test_fp8_on_a_mamba_state_is_refused_naming_the_pool(tmp_path, request):
    anchor, mamba = real_host_pool("page_first"), mamba_pool("page_first")
    refused = r'(?s)"codec": "fp8".*MambaPoolHost holds uint8.*"codec": "zstd"'
    with pytest.raises((ConfigError, BackendLoadError), match=refused):
        bridge(group(anchor, mamba=mamba), extra_for("file", tmp_path, request, "fp8"), mla=False)


def test_a_backend_without_blob_methods_is_refused_with_the_fix(tmp_path, request):
    with pytest.raises((ConfigError, BackendLoadError), match=r'(?s)"codec": "zstd".*hf3fs.*leave "codec" out'):
        bridge(real_host_pool("page_first"), extra_for("hf3fs", tmp_path, request, "zstd"), mla=False)
