"""hicache's KV events read by vLLM's own decoder: a cache on the file backend publishes over ZMQ
(ZmqPublisher), a plain SUB socket receives, and ``msgspec.msgpack.Decoder(KVEventBatch)`` from the installed
vLLM -- what llm-d's, Dynamo's and vLLM's routers decode with -- reads every batch, with hicache's page keys as
vLLM's integer block hashes, each tier as vLLM's medium and the tokens of every stored block."""

from __future__ import annotations

import json
import time
import warnings

import msgspec
import zmq

with warnings.catch_warnings():  # vLLM's import-time notices about torch APIs are not ours to fix
    warnings.simplefilter("ignore")
    from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

from hicache_core.events import block_hash
from hicache_core.events.publisher import KVEventsConfig, ZmqPublisher
from hicache_core.keys import hash_chain
from hicache_core.testing.cache import file_cache

PS = 16


def test_vllm_decodes_every_batch(tmp_path):
    cache = file_cache(tmp_path, PS)
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


def test_vllms_own_stream_carries_hicaches_tiers_under_vllms_block_hashes(tiny, tmp_path):
    """A real vLLM with HiCacheConnector and KV events on: vLLM's publisher sends, beside its own GPU blocks, the
    blocks the connector put in its host tier (CPU) and backed up to storage (STORAGE), under the same hashes vLLM
    gives those blocks (a router sees one block in three places) with their tokens; a host tier too small for the
    conversations also reports CPU removals. Read with vLLM's own decoder (run_vllm.py)."""
    from conftest import conversations, start_vllm

    connector = {
        "hicache_size": 0.0002,  # 6 blocks of 32 KiB: the conversations need about 12, so the host tier evicts
        "hicache_storage_backend": "file",
        "hicache_storage_backend_extra_config": {"prefetch_threshold": 0, "storage_dir": str(tmp_path / "kv")},
    }
    proc = start_vllm(tmp_path, tiny, connector, conversations(2, 3, 300), events=True, prefix_caching=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, (proc.stdout + proc.stderr)[-6000:]
    events = json.loads(line[len("RESULT ") :])["events"]
    gpu = {  # vLLM's own blocks: one event per run of blocks, their tokens concatenated
        h: e["tokens"][i * 32 : (i + 1) * 32]
        for e in events
        if e["type"] == "BlockStored" and e["medium"] == "GPU"
        for i, h in enumerate(e["hashes"])
    }
    cpu = [e for e in events if e["type"] == "BlockStored" and e["medium"] == "CPU"]
    stored = [e for e in events if e["type"] == "BlockStored" and e["medium"] == "STORAGE"]
    assert gpu and cpu and stored, sorted({(e["type"], e["medium"]) for e in events})
    for e in cpu + stored:  # every hicache block is one vLLM named, with vLLM's tokens for it
        (h,) = e["hashes"]
        assert h in gpu and e["tokens"] == gpu[h] and len(e["tokens"]) == 32
        assert e["parent"] is None or e["parent"] in gpu
    assert {h for e in cpu for h in e["hashes"]} == {h for e in stored for h in e["hashes"]}  # write_through
    assert any(e["type"] == "BlockRemoved" and e["medium"] == "CPU" for e in events)  # the small host tier evicted
