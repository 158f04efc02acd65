"""HiCacheForSGLang on SGLang's REAL host pools (``MHATokenToKVPoolHost``, ``MLATokenToKVPoolHost``, built by their
own constructors), every layout, every hicache backend, zero copy and the v0 flat-page path: the bytes read are
the bytes written, page by page, and a page written through one pool reads right through every other pool that
shares its storage namespace (another layout with the same page byte order, v0, hicache's own host pool).

Found here: SGLang lists an MHA layer_first page's segments as ``[k_l0, v_l0, k_l1, ...]`` while its flat page is
all K then all V; the bridge stored pages in the listing order, so such pages came back right only through the
same pool and layout (same-pool round trips passed; everything else was wrong KV).
"""

import pytest
import torch
from real_pools import LAYOUTS, PS, bridge, indices, keys, page_bytes, real_host_pool, spec_of, store

from hicache_core.memory import HostPool


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend_name", ["file", "hf3fs", "memory"])
def test_pages_roundtrip_on_a_real_pool(tmp_path, backend_name, layout, mla):
    pool = real_host_pool(layout, mla=mla)
    b = bridge(pool, store(backend_name, tmp_path), mla=mla)
    src, dst = indices([3, 0, 7, 1, 12, 5, 9, 2]), indices([20, 14, 11, 25, 16, 30, 18, 22])  # scattered pages
    ks = keys(8)
    assert b.batch_set_v1(ks, src) == [True] * 8
    assert b.batch_exists(ks) == 8
    assert b.batch_get_v1(ks, dst) == [True] * 8
    assert page_bytes(pool, dst) == page_bytes(pool, src)
    # v0 reads what v1 wrote: SGLang's flat page, byte for byte
    got = b.get(ks[0], pool.get_dummy_flat_data_page())
    assert got is not None and got.contiguous().view(torch.uint8).numpy().tobytes() == page_bytes(pool, src)[0]
    b.close()


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_what_a_real_pool_wrote_reads_right_everywhere_that_shares_its_namespace(tmp_path, layout, mla):
    """Fails before the fix for MHA layer_first: hicache's pool, a page_first_direct SGLang pool and v0 read
    SGLang's segment listing order as if it were the flat page."""
    extra = store("file", tmp_path)
    theirs = real_host_pool(layout, mla=mla)
    writer = bridge(theirs, extra, mla=mla)
    src = indices([2, 5])
    ks = keys(2)
    assert writer.batch_set_v1(ks, src) == [True, True]
    want = page_bytes(theirs, src)
    ours = HostPool(spec_of(mla), 16 * PS, PS, layout, pin_memory=False)
    readers = [ours]
    if layout != "page_first":  # layer_first and page_first_direct pages are the same bytes (one namespace)
        readers.append(real_host_pool("page_first_direct" if layout == "layer_first" else "layer_first", mla=mla))
    for pool in readers:
        r = bridge(pool, extra, mla=mla)
        dst = indices([9, 4])
        assert r.batch_get_v1(ks, dst) == [True, True], type(pool).__name__
        assert page_bytes(pool, dst) == want, f"{type(pool).__name__} {pool.layout}"
    # and hicache's own pool writes pages the real pool reads
    back = bridge(ours, extra, mla=mla)
    src2 = ours.alloc(2 * PS)
    ours.raw.copy_(torch.randint(0, 256, ours.raw.shape, dtype=torch.uint8))
    ks2 = keys(2)
    assert back.batch_set_v1(ks2, src2) == [True, True]
    dst2 = indices([11, 13])
    assert writer.batch_get_v1(ks2, dst2) == [True, True]
    assert page_bytes(theirs, dst2) == page_bytes(ours, src2)


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_mooncake_zero_copy_on_a_real_pool(tmp_path, master, layout):
    pool = real_host_pool(layout)
    b = bridge(pool, {"hicache_backend": "mooncake", **master.extra()}, mla=False)
    src, dst = indices([1, 6, 3]), indices([10, 8, 15])
    ks = keys(3)
    assert b.batch_set_v1(ks, src) == [True] * 3 and b.batch_exists(ks) == 3
    assert b.batch_get_v1(ks, dst) == [True] * 3
    assert page_bytes(pool, dst) == page_bytes(pool, src)
    b.close()


def test_mla_rank_zero_writes_and_rank_one_reads_on_real_pools(tmp_path):
    extra = store("file", tmp_path)
    pools = [real_host_pool("page_first_direct", mla=True) for _ in range(2)]
    r0, r1 = (bridge(p, extra, mla=True, tp_rank=r, tp_size=2) for r, p in enumerate(pools))
    ks = keys(2)
    assert r1.batch_set_v1(ks, indices([1, 2])) == [True, True] and r0.batch_exists(ks) == 0  # rank 1 never writes
    assert r0.batch_set_v1(ks, indices([1, 2])) == [True, True]
    assert r1.batch_get_v1(ks, indices([7, 8])) == [True, True]
    assert page_bytes(pools[1], indices([7, 8])) == page_bytes(pools[0], indices([1, 2]))


def test_registration_leaves_the_pool_as_it_found_it():
    pool = real_host_pool("layer_first")
    before = pool.kv_buffer.clone()
    from hicache_core.sglang import SGLangHostPool

    SGLangHostPool(pool, spec_of(False))
    assert torch.equal(pool.kv_buffer.view(torch.uint8), before.view(torch.uint8))
