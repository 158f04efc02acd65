"""HiCacheForSGLang on SGLang's other REAL host pools, each built by its own constructor on the CPU: asymmetric K/V
head dims, K-only (sparse index K), and a ``HostPoolGroup`` holding the full-attention KV anchor beside a
sliding-window pool or a Mamba state pool, moved by SGLang's v2 calls (``register_mem_host_pool_v2``,
``batch_set_v2`` / ``batch_get_v2`` / ``batch_exists_v2`` with ``PoolTransfer``) the way its hybrid cache
controller makes them. Bytes read are the bytes written, through file, hf3fs, memory and mooncake; a page of one
kind never reads as a page of another; a kind hicache does not know is refused at registration, naming its class.

MXFP8 (``MHATokenToKVPoolMXFP8Host``) cannot be constructed here: SGLang 0.5.23 requires its CUDA/HIP staged JIT
write-back kernel in the constructor, and its own flat-page and zero-copy calls raise (its scales live outside the
pages it exposes). The refusal test uses a real instance of SGLang's class made without its constructor: the
refusal is by class, before any of its methods is called.
"""

import pytest
import torch
from real_pools import (
    PS,
    asymmetric_pool,
    bridge,
    group,
    indices,
    k_only_pool,
    keys,
    mamba_pool,
    real_host_pool,
    store,
    swa_pool,
)
from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolName, PoolTransfer, PoolTransferResult

from hicache_core.errors import BackendLoadError

BACKENDS = ["file", "hf3fs", "memory", "mooncake"]


def extra_for(name, tmp_path, request) -> dict:
    if name == "mooncake":
        return {"hicache_backend": "mooncake", **request.getfixturevalue("master").extra()}
    return store(name, tmp_path)


def segment_bytes(side, host_indices) -> list[bytes]:
    """Each page's bytes as hicache's bridge reads them (its segments, in page byte order)."""
    return [b"".join(bytes(s) for s in page) for page in side.page_memoryviews(host_indices)]


def flat(pool, index) -> bytes:
    return pool.get_data_page(int(index), flat=True).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_asymmetric_kv_pages_roundtrip(tmp_path, request, backend_name, layout):
    pool = asymmetric_pool(layout)
    b = bridge(pool, extra_for(backend_name, tmp_path, request), mla=False)
    seen = b.backend.mem_pool_host
    src, dst = indices([3, 0, 7]), indices([20, 14, 11])
    ks = keys(3)
    assert b.batch_set_v1(ks, src) == [True] * 3 and b.batch_exists(ks) == 3
    assert b.batch_get_v1(ks, dst) == [True] * 3
    want = segment_bytes(seen, src)
    assert segment_bytes(seen, dst) == want
    k_bytes = PS * 3 * 2 * 8 * 2  # tokens x layers x heads x K head dim x bf16
    assert len(want[0]) == k_bytes + k_bytes // 2  # K run, then V run of half the width
    # the K run is SGLang's K buffer for those tokens, byte for byte
    k_rows = pool.k_buffer[3] if layout == "page_first_direct" else pool.k_buffer[3 * PS : 4 * PS]
    assert want[0][:k_bytes] == k_rows.contiguous().view(torch.uint8).numpy().tobytes()
    if backend_name != "mooncake":  # v0 reads what v1 wrote (SGLang has no flat page for this kind; hicache's is
        # its two runs)
        got = b.get(ks[0], seen.dummy_flat_page())
        assert got is not None and got.contiguous().view(torch.uint8).numpy().tobytes() == want[0]
    b.close()


def test_asymmetric_pages_never_read_as_symmetric_ones(tmp_path):
    extra = store("file", tmp_path)
    asym = bridge(asymmetric_pool("page_first"), extra, mla=False)
    sym = bridge(real_host_pool("page_first"), extra, mla=False)
    ks = keys(2)
    assert asym.batch_set_v1(ks, indices([1, 2])) == [True, True]
    assert sym.batch_exists(ks) == 0 and sym.batch_get_v1(ks, indices([5, 6])) == [False, False]
    assert asym.storage_config.namespace.tag != sym.storage_config.namespace.tag
    assert "mha-asym/k8-v4" in asym.storage_config.namespace.page_format


def v2(name, ks, host_indices, policy=PoolHitPolicy.ALL_PAGES):
    return PoolTransfer(name=PoolName(name), keys=list(ks), host_indices=host_indices, hit_policy=policy)


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_full_plus_sliding_window_group(tmp_path, request, backend_name, layout):
    """A hybrid SWA model: full-attention KV in the anchor, the window layers' KV in the swa pool. SGLang writes
    every page's KV (v1) and the window's trailing pages of the swa pool (v2); a hit needs both."""
    if backend_name == "mooncake" and layout == "layer_first":
        pytest.skip("the mooncake backend serves page_first layouts only (refused at start; tested in its plugin)")
    anchor, swa = real_host_pool(layout), swa_pool(layout)
    b = bridge(group(anchor, swa=swa), extra_for(backend_name, tmp_path, request), mla=False)
    assert sorted(b.side.pools) == ["swa"]
    ks = keys(6)
    src, dst = indices([2, 5, 1, 9, 3, 7]), indices([20, 14, 11, 25, 16, 30])
    assert b.batch_set_v1(ks, src) == [True] * 6
    window = 2  # the window covers the last two pages
    assert b.batch_set_v2([v2("swa", ks[-window:], src[-window * PS :])]) == {"swa": [True, True]}
    trailing = v2("swa", ks[-window:], None, PoolHitPolicy.TRAILING_PAGES)
    hit = b.batch_exists_v2(ks, [trailing])
    assert isinstance(hit, PoolTransferResult) and hit.kv_hit_pages == 6
    # one page longer: its window's last page was never stored, and the prefix before it has no stored window
    longer = ks + keys(1)
    assert b.batch_set_v1(longer[-1:], indices([4])) == [True]
    assert b.batch_exists_v2(longer, [trailing]).kv_hit_pages == 6  # cut back to where the window ends
    assert b.batch_exists_v2(ks[:5], [trailing]).kv_hit_pages == 0  # the window ending at page 5 is not stored
    got = b.batch_get_v2([v2("swa", ks[-window:], dst[-window * PS :])])
    assert got == {"swa": [True, True]}
    assert b.batch_get_v1(ks, dst) == [True] * 6
    side = b.side.pools["swa"].handle.mem_pool_host
    assert segment_bytes(side, dst[-window * PS :]) == segment_bytes(side, src[-window * PS :])
    for s, d in zip(src[::PS][-window:], dst[::PS][-window:]):
        assert flat(swa, d) == flat(swa, s)  # SGLang's own flat page of the swa pool agrees
    for s, d in zip(src[::PS], dst[::PS]):
        assert flat(anchor, d) == flat(anchor, s)
    b.close()


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_full_plus_mamba_group(tmp_path, request, backend_name, layout):
    """A hybrid Mamba model: KV pages for the attention layers, one Mamba state slot for the prefix's last page."""
    anchor, mamba = real_host_pool(layout), mamba_pool(layout)
    b = bridge(group(anchor, mamba=mamba), extra_for(backend_name, tmp_path, request), mla=False)
    ks = keys(4)
    assert b.batch_set_v1(ks, indices([1, 2, 3, 4])) == [True] * 4
    slot = torch.tensor([3])  # the request's state slot in the Mamba host pool (page size 1)
    assert b.batch_set_v2([v2("mamba", ks[-1:], slot)]) == {"mamba": [True]}
    trailing = v2("mamba", ks[-1:], None, PoolHitPolicy.TRAILING_PAGES)
    assert b.batch_exists_v2(ks, [trailing]).kv_hit_pages == 4
    assert b.batch_exists_v2(ks[:3], [trailing]).kv_hit_pages == 0  # no state stored at page 3's end
    landing = torch.tensor([9])
    assert b.batch_get_v2([v2("mamba", ks[-1:], landing)]) == {"mamba": [True]}
    assert flat(mamba, 9) == flat(mamba, 3)  # SGLang's own slot bytes: temporal state, then conv states
    assert len(flat(mamba, 9)) == 2 * (2 * 4 * 4 * 4 + 6 * 3 * 2)
    # the state is stored under the page's key in its own namespace: the KV pool's page under that key is another
    assert b.side.pools["mamba"].handle.namespace_tag != b.backend.namespace_tag
    b.close()


def test_a_mamba_state_of_another_shape_is_a_miss(tmp_path):
    extra = store("file", tmp_path)
    a = bridge(group(real_host_pool("page_first"), mamba=mamba_pool("page_first")), extra, mla=False)
    other = mamba_pool("page_first", conv_shapes=((5, 3),))
    b = bridge(group(real_host_pool("page_first"), mamba=other), extra, mla=False)
    ks = keys(1)
    assert a.batch_set_v1(ks, indices([0])) == [True]
    assert a.batch_set_v2([v2("mamba", ks, torch.tensor([1]))]) == {"mamba": [True]}
    trailing = v2("mamba", ks, None, PoolHitPolicy.TRAILING_PAGES)
    assert a.batch_exists_v2(ks, [trailing]).kv_hit_pages == 1
    assert b.batch_exists_v2(ks, [trailing]).kv_hit_pages == 0  # KV found, state of another shape: no hit
    assert b.batch_get_v2([v2("mamba", ks, torch.tensor([2]))]) == {"mamba": [False]}


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
@pytest.mark.parametrize("backend_name", ["file", "hf3fs", "memory"])
def test_k_only_index_pool(tmp_path, backend_name, layout):
    """MiniMax's sparse index K beside the KV: every page of the prefix must have its index K (all_pages). In
    layer_first SGLang gives no zero-copy segments for it; hicache takes the contiguous runs of its page view."""
    anchor = real_host_pool(layout)
    konly = k_only_pool(anchor, layout)
    b = bridge(group(anchor, indexer=konly), store(backend_name, tmp_path), mla=False)
    ks = keys(3)
    src, dst = indices([1, 4, 2]), indices([10, 12, 13])
    assert b.batch_set_v1(ks, src) == [True] * 3
    assert b.batch_set_v2([v2("indexer", ks[:2], src[: 2 * PS])]) == {"indexer": [True, True]}
    need_all = v2("indexer", ks, None)
    hit = b.batch_exists_v2(ks, [need_all])
    assert hit.kv_hit_pages == 2 and hit.extra_pool_hit_pages == {"kv": 3, "indexer": 2}
    assert b.batch_get_v2([v2("indexer", ks[:2], dst[: 2 * PS])]) == {"indexer": [True, True]}
    for s, d in zip(src[::PS][:2], dst[::PS][:2]):
        assert flat(konly, d) == flat(konly, s)
    b.close()


def _bare(cls):
    pool = object.__new__(cls)
    pool.layout = "page_first"
    return pool


def test_unknown_kinds_are_refused_naming_the_class(tmp_path):
    from sglang.srt.mem_cache.pool_host.mha import HiSparseMHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mha_mxfp8 import MHATokenToKVPoolMXFP8Host

    extra = store("file", tmp_path)
    for cls in (MHATokenToKVPoolMXFP8Host, HiSparseMHATokenToKVPoolHost):
        pool = object.__new__(cls)  # see the module docstring: the refusal is by class, before any call
        pool.layout = "page_first"  # what SGLang's factory reads of a pool before registering it
        with pytest.raises(BackendLoadError, match=cls.__name__) as e:
            bridge(pool, extra, mla=False)
        assert "serves" in str(e.value)
    with pytest.raises(BackendLoadError, match="UE8M0 scales"):
        bridge(
            pool if isinstance(pool, MHATokenToKVPoolMXFP8Host) else _bare(MHATokenToKVPoolMXFP8Host), extra, mla=False
        )
    # a side pool of an unknown kind: refused when SGLang registers it, and nothing is stored for it
    b = bridge(real_host_pool("page_first"), extra, mla=False)
    with pytest.raises(BackendLoadError, match="MHATokenToKVPoolMXFP8Host"):
        b.register_mem_host_pool_v2(object.__new__(MHATokenToKVPoolMXFP8Host), PoolName.SWA)
    assert b.side.pools == {}
    # a Mamba pool is never the anchor
    with pytest.raises(BackendLoadError, match="side pool"):
        bridge(mamba_pool("page_first"), extra, mla=False)


def test_a_pool_never_registered_or_a_policy_not_known_is_a_miss(tmp_path):
    b = bridge(real_host_pool("page_first"), store("file", tmp_path), mla=False)
    ks = keys(2)
    assert b.batch_set_v1(ks, indices([0, 1])) == [True, True]
    assert b.batch_exists_v2(ks, [v2("mamba", ks[-1:], None, PoolHitPolicy.TRAILING_PAGES)]).kv_hit_pages == 0
    groups = PoolTransfer(name=PoolName.SWA, keys=ks, hit_policy=PoolHitPolicy.BLOCK_GROUPS)
    assert b.batch_exists_v2(ks, [groups]).kv_hit_pages == 0
    assert b.batch_get_v2([v2("mamba", ks[-1:], torch.tensor([0]))]) == {"mamba": [False]}
    assert b.batch_exists_v2(ks, []).kv_hit_pages == 2  # no side pool asked: the KV hit
