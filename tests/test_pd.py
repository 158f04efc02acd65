"""Prefill/decode disaggregation on the reference engine: KV handed over through a real file store.

Two engines stand for the two instances (the server runs each in its own process: tests_serve/test_pd.py); they
share nothing but the storage directory."""

import pytest

from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama
from hicache_core.errors import ConfigError

PAGE = 16
MODEL = ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    seed=3,
)


def config(tmp_path, **kw) -> HiCacheConfig:
    kw.setdefault("hicache_storage_prefetch_policy", "wait_complete")  # the seed's PD recipes
    return HiCacheConfig(
        page_size=PAGE,
        enable_hierarchical_cache=True,
        hicache_ratio=2.0,
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(tmp_path / "store"), "prefetch_threshold": PAGE},
        **kw,
    )


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(MODEL.vocab_size) for _ in range(length)] for _ in range(n)]


def run(engine: Engine, ps: list[list[int]], new: int, tag: str) -> list[Request]:
    reqs = [Request(f"{tag}-{i}", list(p), new) for i, p in enumerate(ps)]
    engine.generate(reqs)
    return reqs


def reference(ps, new):
    engine = Engine(TinyLlama(MODEL), HiCacheConfig(page_size=PAGE), "none", device_tokens=2048)
    return [r.output for r in run(engine, ps, new, "ref")]


def test_decode_loads_what_prefill_stored_and_generates_the_single_process_tokens(tmp_path):
    model = TinyLlama(MODEL)
    ps = prompts(3, 5 * PAGE + 7)
    prefill = Engine(model, config(tmp_path), disaggregation_mode="prefill", device_tokens=1024)
    decode = Engine(model, config(tmp_path), disaggregation_mode="decode", device_tokens=1024)
    try:
        first = run(prefill, ps, 8, "p")
        # answered only once the prompt's pages are in storage: nothing left in flight, each page on disk
        assert all(len(r.output) == 1 for r in first) and not prefill.handing_off
        assert not any(prefill.cache.backup_in_flight(p) for p in ps)
        out = run(decode, ps, 8, "d")
        for r in out:  # every whole page came from storage; only the last partial page was computed
            assert r.cached["storage"] == 5 * PAGE, r.cached
        assert [r.output for r in out] == reference(ps, 8)
        assert [r.output[0] for r in out] == [r.output[0] for r in first]
        # prefill generates one token whatever max_new_tokens says: a request whose reply would not fit runs
        big = Request("p-big", list(ps[0]), 2048)
        prefill.generate([big])
        assert big.output == first[0].output and big.finish_reason == "length"
        # decode without offload only reads: the store holds the prompts' pages and nothing decode generated
        assert decode.metrics.stats()["hit_tokens"]["storage"] == 3 * 5 * PAGE
        decode.flush()
        assert decode.metrics.stats()["backuped_tokens"] == 0 and prefill.metrics.stats()["backuped_tokens"] > 0
    finally:
        prefill.close()
        decode.close()


def test_decode_offload_lets_the_next_turns_prefill_hit_generated_tokens(tmp_path):
    model = TinyLlama(MODEL)
    ps = prompts(2, 3 * PAGE)
    out_len = 2 * PAGE + 1  # the prompt, then two whole pages of generated tokens
    results = {}
    for offload in (False, True):
        d = tmp_path / ("on" if offload else "off")
        d.mkdir()
        prefill = Engine(model, config(d), disaggregation_mode="prefill", device_tokens=1024)
        decode = Engine(model, config(d), disaggregation_mode="decode", offload_kvcache=offload, device_tokens=1024)
        try:
            run(prefill, ps, out_len, "p1")
            turn1 = run(decode, ps, out_len, "d1")
            decode.flush()  # offload is asynchronous; the next turn arrives later in real life
            prefill.close()
            # a fresh prefill instance (nothing in its own tiers): all it hits comes from storage
            prefill = Engine(model, config(d), disaggregation_mode="prefill", device_tokens=1024)
            nxt = [p + r.output + [7] * PAGE for p, r in zip(ps, turn1)]
            turn2 = run(prefill, nxt, 1, "p2")
            results[offload] = [r.cached["storage"] for r in turn2]
            assert [r.output for r in turn1] == reference(ps, out_len)
        finally:
            prefill.close()
            decode.close()
    assert results[False] == [3 * PAGE, 3 * PAGE]  # the prompt prefill stored
    assert results[True] == [5 * PAGE, 5 * PAGE]  # + the two pages decode generated and offloaded


def test_role_flags_are_checked(tmp_path):
    model = TinyLlama(MODEL)
    with pytest.raises(ConfigError, match="storage tier they share"):
        Engine(
            model,
            HiCacheConfig(page_size=PAGE, enable_hierarchical_cache=True),
            "hicache",
            disaggregation_mode="prefill",
        )
    with pytest.raises(ConfigError, match="for a decode instance"):
        Engine(model, config(tmp_path), disaggregation_mode="prefill", offload_kvcache=True)
    with pytest.raises(ConfigError, match="write_through, not write_back"):
        Engine(model, config(tmp_path, hicache_write_policy="write_back"), disaggregation_mode="prefill")
    with pytest.raises(ConfigError, match="choose one of null, prefill, decode"):
        Engine(model, config(tmp_path), disaggregation_mode="both")
    decode = Engine(
        model, config(tmp_path, hicache_storage_prefetch_policy="best_effort"), disaggregation_mode="decode"
    )
    try:  # decode waits for all of what prefill handed over, from the first page
        assert decode.config.hicache_storage_prefetch_policy == "wait_complete"
        assert decode.config.prefetch_threshold == PAGE
    finally:
        decode.close()
