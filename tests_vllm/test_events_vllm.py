"""hicache's KV events read by vLLM's own decoder: a cache on the file backend publishes over ZMQ
(ZmqPublisher), a plain SUB socket receives, and ``msgspec.msgpack.Decoder(KVEventBatch)`` from the installed
vLLM -- what llm-d's, Dynamo's and vLLM's routers decode with -- reads every batch, with hicache's page keys as
vLLM's integer block hashes, each tier as vLLM's medium and the tokens of every stored block."""

from __future__ import annotations

import time
import warnings

import msgspec
import torch
import zmq

with warnings.catch_warnings():  # vLLM's import-time notices about torch APIs are not ours to fix
    warnings.simplefilter("ignore")
    from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

from hicache_core.cache import build_cache
from hicache_core.config import HiCacheConfig
from hicache_core.events import block_hash
from hicache_core.events.publisher import KVEventsConfig, ZmqPublisher
from hicache_core.keys import hash_chain
from hicache_core.memory import KVSpec

PS = 16


def test_vllm_decodes_every_batch(tmp_path):
    cfg = HiCacheConfig(
        page_size=PS,
        hicache_io_backend="direct",
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(tmp_path), "prefetch_threshold": PS},
    )
    spec = KVSpec(layer_num=2, head_num=1, head_dim=8, dtype=torch.float32)
    cache = build_cache(cfg, spec, 8 * PS, tiers="hicache+storage", device="cpu", host_tokens=16 * PS)
    pub = ZmqPublisher(KVEventsConfig(enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:*", topic="hc"))
    cache.fleet.subscribe_events(pub)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"hc")
    sub.connect(pub.endpoint)
    time.sleep(0.3)
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    try:
        prompts = [list(range(1000 * k, 1000 * k + 5 * PS)) for k in range(1, 5)]
        for i, p in enumerate(prompts):  # four prompts through a device tier of eight pages: demotions too
            adm = cache.admit(f"r{i}", p + [7], 0)
            while adm.status == "wait":
                cache.poll()
                adm = cache.admit(f"r{i}", p + [7], 0)
            cache.ready_to_load_host_cache()
            cache.release(adm, p + [7], len(p) + 1 - len(adm.prefix))
            cache.flush()
        batches = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sub.poll(300):
            topic, seq, payload = sub.recv_multipart()
            batches.append(decoder.decode(payload))  # vLLM's own types: raises on anything it cannot read
        events = [e for b in batches for e in b.events]
        stored = {(h, e.medium) for e in events if isinstance(e, BlockStored) for h in e.block_hashes}
        for p in prompts:
            for key in hash_chain(p, PS):
                assert {(block_hash(key), m) for m in ("GPU", "CPU", "STORAGE")} <= stored
        first = next(e for e in events if isinstance(e, BlockStored))
        assert first.token_ids == prompts[0] and first.block_size == PS and first.parent_block_hash is None
        assert any(isinstance(e, BlockRemoved) and e.medium == "GPU" for e in events)  # demoted to host
    finally:
        sub.close(0)
        ctx.term()
        cache.close()
