"""A storage backend attached at runtime (SGLang's PUT /hicache/storage-backend) runs exactly as one configured at
start: its own prefetch knobs, and the MLA rule that only rank 0 writes shared pages.

Found here: the controller kept the threshold, timeouts and stall limit of its construction (attach refreshed
only the policy name), and attach_backend did not make MLA ranks other than 0 read-only."""

import uuid

import torch
from cache_helpers import PS, make_cache, run_request, seq

from hicache_core.cache import build_cache
from hicache_core.cache.build import attach_backend
from hicache_core.config import HiCacheConfig
from hicache_core.memory import KVSpec
from hicache_core.storage.adapter import ReadOnlyRank


def test_an_attached_backend_brings_its_own_prefetch_knobs():
    c = make_cache(device_pages=8, host_pages=16)  # host tier, no storage
    cfg = c.config.replace(
        hicache_storage_backend="memory",
        hicache_storage_prefetch_policy="timeout",
        hicache_storage_backend_extra_config={
            "store": uuid.uuid4().hex,
            "prefetch_threshold": 48,
            "prefetch_timeout_base": 3.0,
            "prefetch_timeout_per_ki_token": 2.0,
        },
    )
    attach_backend(c, cfg)
    policy = c.controller.io.policy
    assert (policy.name, policy.threshold, policy.timeout_base) == ("timeout", 48, 3.0)
    assert policy.timeout_per_page == PS / 1024 * 2.0 and policy.stall_limit == 12.0
    c.operator.detach_storage()
    attach_backend(c, cfg.replace(hicache_storage_backend_extra_config={"store": uuid.uuid4().hex}))
    assert c.controller.io.policy.threshold == 256  # the defaults again, not the last attach's
    c.close()


def test_an_mla_rank_other_than_zero_attached_at_runtime_only_reads():
    mla = KVSpec(layer_num=2, head_num=1, head_dim=2, dtype=torch.float32, is_mla=True)
    store = uuid.uuid4().hex
    cfg = HiCacheConfig(page_size=PS, hicache_io_backend="direct", model_name="m")
    caches = [
        build_cache(
            cfg,
            mla,
            16 * PS,
            tiers="hicache",
            device="cpu",
            host_tokens=16 * PS,
            pin_memory=False,
            tp_rank=r,
            tp_size=2,
        )
        for r in (0, 1)
    ]
    storage = cfg.replace(hicache_storage_backend="memory", hicache_storage_backend_extra_config={"store": store})
    for rank, c in enumerate(caches):
        attach_backend(c, storage, tp_rank=rank, tp_size=2)
    assert isinstance(caches[1].storage, ReadOnlyRank) and not isinstance(caches[0].storage, ReadOnlyRank)
    run_request(caches[1], seq(1, 3), "r1")  # rank 1 computes and "backs up": nothing reaches the store
    caches[1].flush()
    assert caches[1].storage.batch_exists(caches[1].match_prefix(seq(1, 3)).last_node.hash_value) == 0
    run_request(caches[0], seq(1, 3), "r0")  # rank 0 writes the shared pages
    caches[0].flush()
    assert caches[1].storage.batch_exists(caches[1].match_prefix(seq(1, 3)).last_node.hash_value) == 3
    for c in caches:
        c.close()
