"""Sliding-window, hybrid, MLA and Mamba models in our engine, against transformers' own ``generate`` as the oracle:
a random-initialized Mistral (every layer windowed), a Qwen2 with its odd layers windowed and its even layers full
(a hybrid, as Gemma's and gpt-oss's are), a DeepSeek-V2 (multi-head latent attention, queries plain or through
their own low-rank projection) and a Bamba (Mamba-2 mixers on its even layers, half-rotary attention on the odd
ones; each mixer's state restored from the page with the KV). Greedy tokens equal transformers' with the cache
cold, warm from the device, warm from the host and warm from storage (the file backend), for prompts several
windows long."""

from __future__ import annotations

import attrs
import pytest

from hicache_core.config import HiCacheConfig
from hicache_core.engine.checkpoint import load_model
from hicache_core.engine.engine import Engine
from hicache_core.engine.model import TinyLlama
from hicache_core.engine.request import Request
from hicache_core.testing.checkpoint import make_checkpoint

from conftest import CORPUS, hf_generate

WINDOW = 24  # tokens: a prompt of ~175 tokens spans seven windows; a 16-token page is less than one
N = 12
PROMPTS = [CORPUS[i * 53 : i * 53 + 400] for i in range(3)]  # three prompts with little in common


WINDOWED = {"mistral-swa": ("mistral", "swa", None), "qwen2-hybrid": ("qwen2", "hybrid", None)}
MLA = {"deepseek_v2-mla": ("deepseek_v2", "full", None), "deepseek_v2-q_lora": ("deepseek_v2", "full", 32)}
MAMBA = {"bamba-mamba2": ("bamba", "mamba", None)}  # transformers runs its mixers by their torch fallback on CPU
_BUILT: dict = {}


def _built(case, tmp_path_factory):
    """(attention kind, our model, prompts' ids, transformers' tokens) of a case, made once a module."""
    if case not in _BUILT:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        arch, kind, q_lora = {**WINDOWED, **MLA, **MAMBA}[case]
        path = make_checkpoint(
            tmp_path_factory.mktemp(case),
            architecture=arch,
            sliding_window=WINDOW,
            layers=4,
            hidden=128,
            heads=4,
            q_lora_rank=q_lora,
        )
        hf = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        ids = [hf[1](p).input_ids for p in PROMPTS]
        _BUILT[case] = kind, load_model(path), ids, [hf_generate(hf, x, N) for x in ids]
    return _BUILT[case]


@pytest.fixture(scope="module", params=[*WINDOWED, *MLA, *MAMBA])
def served(request, tmp_path_factory):
    return _built(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=list(WINDOWED))
def windowed(request, tmp_path_factory):
    return _built(request.param, tmp_path_factory)


def _engine(model, store) -> Engine:
    cfg = HiCacheConfig(
        # a Bamba mixer's state (2,624 float32 values) rides in its share of a page: 32 tokens' K and V
        page_size=32 if model.config.has_mamba else 16,
        hicache_ratio=4,  # the host holds all three prompts; the device (256 tokens) one at a time
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(store), "prefetch_threshold": 64},
        hicache_storage_prefetch_policy="wait_complete",
    )
    return Engine(model, cfg, "hicache+storage", device_tokens=256, max_running=1)


def _round(engine, ids, tag):
    return engine.generate([Request(f"{tag}{i}", x, N) for i, x in enumerate(ids)])


def test_tokens_equal_transformers_cold_and_warm_from_each_tier(served, tmp_path):
    kind, model, ids, expect = served
    assert model.config.attention_kind == kind
    engine = _engine(model, tmp_path / "store")
    if model.config.is_mla:  # one latent per token and layer (128 + 16 rotary), no K and V
        assert engine.pool.kv_buffer.shape == (4, 256, 1, 144)
    try:
        cold = _round(engine, ids, "cold")
        assert [r.output for r in cold] == expect, "cold: tokens differ from transformers"
        again = engine.generate([Request("device", ids[-1], N)])[0]  # the last prompt is still on the device
        assert again.output == expect[-1] and again.cached["device"] >= 160
        host = _round(engine, ids, "host")  # each prompt pushes the one before it off the device
        assert [r.output for r in host] == expect, "warm from host: tokens differ from transformers"
        assert sum(r.cached["host"] for r in host) >= 320, [r.cached for r in host]
        engine.flush()  # every backup in storage, then device and host emptied: what comes back comes from the files
        engine.cache.operator.empty_local_tiers()
        stored = _round(engine, ids, "storage")
        assert [r.output for r in stored] == expect, "warm from storage: tokens differ from transformers"
        assert all(r.cached["storage"] >= 64 for r in stored), [r.cached for r in stored]
    finally:
        engine.close()
    restarted = _engine(model, tmp_path / "store")  # a fresh engine on the same files
    try:
        warm = _round(restarted, ids, "restart")
        assert [r.output for r in warm] == expect and all(r.cached["storage"] >= 64 for r in warm)
    finally:
        restarted.close()


def test_the_window_is_what_makes_the_tokens_right(windowed):
    """The same weights with every layer full attention give other tokens: the windowed layers were exercised
    (a prompt seven windows long), so the equality above is not a llama's by accident."""
    _, model, ids, expect = windowed
    full = TinyLlama(
        attrs.evolve(model.config, sliding_window=None, layer_types=None),
        weights={
            "embed": model.embed,
            "layers": model.layers,
            "final_norm": model.final_norm,
            "lm_head": model.lm_head,
        },
    )
    engine = Engine(full, HiCacheConfig(page_size=16), "none", device_tokens=256, max_running=1)
    try:
        outs = [r.output for r in _round(engine, ids, "full")]
    finally:
        engine.close()
    assert outs != expect
