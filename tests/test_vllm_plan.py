"""The vLLM connector's vLLM-free halves: settings, the scheduler's host index and step plans, the worker's copies.
(The connector inside a real vLLM is tested in tests_vllm/, in the vllm tox env.)"""

from types import SimpleNamespace

import pytest
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.integrations.vllm.plan import HostIndex
from hicache_core.integrations.vllm.scheduler import SchedulerHalf
from hicache_core.integrations.vllm.settings import Geometry, hicache_config, host_pages, staging_pages
from hicache_core.integrations.vllm.worker import WorkerHalf, block_view

BS = 4


def req(rid, tokens, computed=0, salt=None, mm=None):
    return SimpleNamespace(
        request_id=rid,
        all_token_ids=list(tokens),
        num_computed_tokens=computed,
        cache_salt=salt,
        mm_features=mm,
        prompt_embeds=None,
        lora_request=None,
    )


def step(new=(), num=None, cached=()):
    """A SchedulerOutput with new requests [(id, blocks, computed)] and cached ones [(id, new_blocks, computed)]."""
    new_reqs = [SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=c) for r, b, c in new]
    cr = SimpleNamespace(
        req_ids=[r for r, _, _ in cached],
        resumed_req_ids=set(),
        new_block_ids=[(b,) for _, b, _ in cached],
        num_computed_tokens=[c for _, _, c in cached],
    )
    return SimpleNamespace(scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cr, num_scheduled_tokens=num or {})


def half(policy="write_through", pages=8, exists=None, threshold=0):
    cfg = HiCacheConfig(
        page_size=BS,
        hicache_write_policy=policy,
        hicache_storage_backend_extra_config={"prefetch_threshold": threshold},
    )
    return SchedulerHalf(cfg, BS, pages, exists)


def test_host_index_evicts_least_recent_unpinned():
    ix = HostIndex(2)
    a, _ = ix.place("a")
    b, _ = ix.place("b")
    ix.pin([a])
    c, evicted = ix.place("c")
    assert evicted == ("b", b) and c == b  # "a" is pinned
    ix.pin([c])
    assert ix.place("d") == (None, None)  # every slot pinned
    ix.unpin([a])
    assert ix.place("d")[1] == ("a", a)
    assert ix.run(["c", "d", "x"]) == [c, a]


def test_saves_whole_pages_then_offers_them_leaving_the_last_token():
    s = half(exists=None)
    r = req("r1", range(10, 20))  # 10 tokens: 2 whole pages
    assert s.match(r, 0) == (0, False)
    s.after_alloc(r, [7, 8, 9], 0)
    plan = s.build(step(new=[("r1", [7, 8, 9], 0)], num={"r1": 10}))
    assert [b for b, _ in plan.saves] == [7, 8] and plan.backups_after == []  # no storage: no backups
    # the same prompt again: both pages from the host tier; 9 tokens of a 9-token prompt would leave none
    again = req("r2", range(10, 20))
    assert s.match(again, 0) == (8, True)
    assert s.match(req("r3", range(10, 18)), 0) == (4, True)  # 8 tokens: only page 1 is usable


def test_storage_hits_follow_host_hits_and_a_failed_load_is_never_offered_again():
    asked = []

    def exists(keys):
        asked.append(len(keys))
        return len(keys)

    s = half(exists=exists)
    r = req("r", range(100, 117))  # 4 usable pages, none on the host
    assert s.match(r, 0) == (16, True)
    s.after_alloc(r, [1, 2, 3, 4, 5], 16)
    plan = s.build(step())
    assert plan.loads[0].slots == [-1] * 4 and None not in plan.loads[0].keys
    s.load_failed(["r"], plan.loads[0].keys)
    s.loaded({"r"})
    assert s.match(r, 0) == (0, False)  # recomputed, not looped
    other = req("o", range(100, 117))
    assert s.match(other, 0) == (0, False)  # its keys are known unreadable


def test_salt_and_multimodal_requests():
    s = half()
    s.after_alloc(req("a", range(8), salt="t1"), [0, 1, 2], 0)
    s.build(step(new=[("a", [0, 1, 2], 0)], num={"a": 8}))
    assert s.match(req("b", range(9), salt="t1"), 0) == (8, True)
    assert s.match(req("c", range(9), salt="t2"), 0) == (0, False)  # another tenant
    assert s.match(req("d", range(9)), 0) == (0, False)
    assert s.match(req("e", range(9), salt="t1", mm=[object()]), 0) == (0, False)  # images: not cached


def test_write_back_backs_up_what_eviction_overwrites():
    s = half(policy="write_back", pages=2, exists=lambda keys: 0)
    s.after_alloc(req("a", range(12)), [0, 1, 2], 0)
    first = s.build(step(new=[("a", [0, 1, 2], 0)], num={"a": 12}))
    # three pages, two slots: the third is not kept (evicting a page saved in the same step would back up a slot
    # the forward has not filled yet)
    assert len(first.saves) == 2 and first.backups_before == [] and first.backups_after == []
    s.after_alloc(req("b", range(50, 58)), [5, 6], 0)
    second = s.build(step(new=[("b", [5, 6], 0)], num={"b": 8}))
    assert len(second.backups_before) == 2  # both evicted pages go to storage before the forward overwrites them


def test_settings_refuse_what_cannot_work():
    with pytest.raises(ConfigError, match="block size 32"):
        hicache_config({"page_size": 64}, 32, "m")
    with pytest.raises(ConfigError, match="unknown HiCache option 'hicache_sise'"):
        hicache_config({"hicache_sise": 1}, 32, "m")
    with pytest.raises(ConfigError, match="not valid JSON"):
        hicache_config({"hicache_storage_backend_extra_config": "{oops"}, 32, "m")
    cfg = hicache_config({"hicache_storage_backend_extra_config": '{"storage_dir": "/x"}'}, 32, "m")
    assert cfg.page_size == 32 and cfg.hicache_storage_backend_extra_config == {"storage_dir": "/x"}
    with pytest.raises(ConfigError, match="positive integer"):
        staging_pages({"hicache_staging_pages": 0}, 10)
    g = Geometry(("l0", "l1"), 100, 32, 2, 32, torch.float32)
    assert host_pages(cfg, g) == 200
    assert host_pages(cfg.replace(hicache_size=1), g) == int(1e9 // g.page_bytes)


@pytest.mark.parametrize("shape", ["cpu", "cuda"])
def test_worker_copies_whole_blocks_both_ways(shape):
    """vLLM's CPU layout [blocks, heads, tokens, 2*dim] and the CUDA one [2, blocks, tokens, heads, dim]."""
    g = Geometry(("l0", "l1"), 6, BS, 2, 8, torch.float32)
    w = WorkerHalf(g, host_pages=4, staging_pages=2)
    make = (lambda: torch.randn(6, 2, BS, 16)) if shape == "cpu" else (lambda: torch.randn(2, 6, BS, 2, 8))
    caches = {"l0": make(), "l1": make()}
    w.register(caches)
    before = {n: t.clone() for n, t in caches.items()}
    from hicache_core.integrations.vllm.plan import LoadJob, StepPlan

    w.bind(StepPlan([], [(1, 0), (4, 3)], [], []))
    w.save_layer("l0")
    w.after_forward()  # l1 copied here: the forward did not report it
    assert w._load(LoadJob("r", [5, 0], [3, 0], [None, None])) == []
    for n, t in caches.items():
        v, b = block_view(t, 6), block_view(before[n], 6)
        assert torch.equal(v[5], b[4]) and torch.equal(v[0], b[1])
        assert torch.equal(v[2], b[2])  # untouched
    w.close()


def test_write_through_backs_up_each_saved_slot_once():
    s = half(pages=2, exists=lambda keys: 0)
    s.after_alloc(req("a", range(12)), [0, 1, 2], 0)
    plan = s.build(step(new=[("a", [0, 1, 2], 0)], num={"a": 12}))
    assert [slot for slot, _ in plan.backups_after] == [slot for _, slot in plan.saves] == [0, 1]
    s.after_alloc(req("b", range(12)), [3, 4, 5], 0)
    again = s.build(step(new=[("b", [3, 4, 5], 0)], num={"b": 12}))
    # pages 0 and 1 are held; page 2 evicts page 0 (least recent) and is the only page written to storage
    assert again.saves == [(5, 0)] and [slot for slot, _ in again.backups_after] == [0]
    assert again.backups_after[0][1] not in {k for _, k in plan.backups_after}
