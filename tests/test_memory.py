"""Host and device pools: sizing, shapes, page accessors, allocator invariants."""

import ctypes

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.memory import DevicePool, HostPool, KVSpec, PageAllocator, host_pool_tokens

MHA = KVSpec(layer_num=3, head_num=2, head_dim=4, dtype=torch.float16)
MLA = KVSpec(layer_num=3, head_num=1, head_dim=10, dtype=torch.bfloat16, is_mla=True)


@pytest.mark.parametrize(
    "layout, shape",
    [("layer_first", (2, 3, 16, 2, 4)), ("page_first", (2, 16, 3, 2, 4)), ("page_first_direct", (2, 4, 3, 4, 2, 4))],
)
def test_mha_shapes(layout, shape):
    assert tuple(HostPool(MHA, 16, 4, layout, pin_memory=False).kv_buffer.shape) == shape


@pytest.mark.parametrize(
    "layout, shape",
    [("layer_first", (3, 16, 1, 10)), ("page_first", (16, 3, 1, 10)), ("page_first_direct", (4, 3, 4, 1, 10))],
)
def test_mla_shapes(layout, shape):
    assert tuple(HostPool(MLA, 16, 4, layout, pin_memory=False).kv_buffer.shape) == shape


def test_sizes():
    assert MHA.size_per_token == 2 * 3 * 2 * 4 * 2 and MLA.size_per_token == 3 * 10 * 2
    cfg = HiCacheConfig(page_size=4, hicache_ratio=2.5)
    assert host_pool_tokens(cfg, 10, MHA) == 28  # 25 rounded up to whole pages
    cfg = HiCacheConfig(page_size=4, hicache_size=1)
    assert host_pool_tokens(cfg, 10, MHA) == -(-int(1e9 // MHA.size_per_token) // 4) * 4


def test_refuses_what_the_machine_cannot_hold():
    big = KVSpec(layer_num=80, head_num=64, head_dim=128)
    with pytest.raises(ConfigError, match=r"needs .* GiB but this machine has .* GiB available.*lower --hicache-size"):
        host_pool_tokens(HiCacheConfig(hicache_size=100000), 1024, big)
    with pytest.raises(ConfigError, match="holds no page"):
        host_pool_tokens(HiCacheConfig(hicache_ratio=0), 1024, big)


@pytest.mark.parametrize("spec", [MHA, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_page_accessors_agree(spec, layout):
    pool = HostPool(spec, 32, 4, layout, pin_memory=False)
    pool.raw.copy_(torch.randint(0, 256, pool.raw.shape, dtype=torch.uint8))
    idx = torch.tensor([20, 21, 22, 23, 4, 5, 6, 7])
    flat = [pool.get_flat_page(20), pool.get_flat_page(4)]
    # memoryviews, pointers and flat pages all describe the same bytes in the same order
    mvs = pool.page_memoryviews(idx)
    ptrs, sizes = pool.get_page_buffer_meta(idx)
    k = pool.segments_per_page
    assert len(ptrs) == 2 * k and set(sizes) == {pool.segment_bytes}
    for p in range(2):
        expect = flat[p].view(torch.uint8).numpy().tobytes()
        assert b"".join(bytes(m) for m in mvs[p]) == expect
        assert b"".join(ctypes.string_at(a, n) for a, n in zip(ptrs[p * k : (p + 1) * k], sizes)) == expect
    assert pool.page_bytes == spec.page_bytes(4)
    # set_flat_page writes exactly that page
    before = pool.raw.clone()
    pool.set_flat_page(8, flat[0])
    assert torch.equal(pool.get_flat_page(8).view(torch.uint8), flat[0].view(torch.uint8))
    changed = (pool.raw != before).nonzero().flatten()
    seg = pool.segment_offsets(torch.arange(8, 12))[0]
    for off in changed.tolist():
        assert any(s <= off < s + pool.segment_bytes for s in seg)
    with pytest.raises(ValueError, match="not the start of a page"):
        pool.get_flat_page(5)
    with pytest.raises(ValueError, match="expected"):
        pool.set_flat_page(8, torch.zeros(3, dtype=spec.dtype))


def test_layer_first_and_page_first_direct_share_page_bytes():
    a = HostPool(MHA, 16, 4, "layer_first", pin_memory=False)
    b = HostPool(MHA, 16, 4, "page_first_direct", pin_memory=False)
    a.raw.copy_(torch.randint(0, 256, a.raw.shape, dtype=torch.uint8))
    b.set_flat_page(4, a.get_flat_page(8))
    # page 1 of b holds page 2 of a: same K[layer][token] values
    assert torch.equal(b.kv_buffer[:, 1].view(torch.int16), a.kv_buffer[:, :, 8:12].view(torch.int16))


def test_allocator():
    a = PageAllocator(32, 4)
    x = a.alloc(8)
    assert x.tolist() == list(range(8))
    assert a.alloc(6 * 4 + 4) is None and a.available_size() == 24
    with pytest.raises(ValueError, match="not a multiple"):
        a.alloc(5)
    a.free(x)
    with pytest.raises(RuntimeError, match="double free"):
        a.free(x)
    assert a.available_size() == 32
    y = a.alloc(32)
    assert sorted(y.tolist()) == list(range(32))
    assert all(int(y[i]) % 4 == 0 and (y[i : i + 4] == y[i] + torch.arange(4)).all() for i in range(0, 32, 4))


def test_device_pool_layers_and_waiter():
    d = DevicePool(MHA, 16, 4, "cpu")
    waited = []
    d.set_layer_waiter(waited.append)
    k, v = d.get_kv_buffer(2)
    assert waited == [2] and k.shape == (16, 2, 4) and v.data_ptr() != k.data_ptr()
    d.set_kv(1, torch.tensor([3]), torch.ones(1, 2, 4), torch.full((1, 2, 4), 2.0))
    assert d.k_buffer(1)[3].sum() == 8 and d.v_buffer(1)[3].sum() == 16
