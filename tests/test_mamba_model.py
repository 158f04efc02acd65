"""Mamba-2 hybrids in the reference engine (the random model; tests_serve/test_window_models.py checks a Bamba
checkpoint against transformers): each Mamba layer's state rides in the page after the page's last token, so every
cache configuration gives the no-cache tokens, the state a warm request resumes from is bit for bit the one the
cold run left, a cache that restored the KV but not the state would serve other tokens, and what cannot be served
(a page too small for the state, fp8, tensor parallel, the fp8 codec) is refused naming why."""

import json
from pathlib import Path

import pytest
import torch
from test_engine import SMALL, parse

from hicache_core.bench import multiturn
from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama, mamba
from hicache_core.engine.model_config import FULL, LINEAR, attention_fields
from hicache_core.engine.tp import check_divisible
from hicache_core.errors import ConfigError

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
PAGE = 64  # a 64-token page's share of a layer (2 KV heads x 16 x K and V, bfloat16) is 8 KiB: the state is 5.7


def _model(**over) -> TinyLlama:
    return TinyLlama(ModelConfig(**SHAPE, head_dim=16, **{**attention_fields("mamba", 4, 0), **over}))


def _prompt(seed: int, n: int = 200) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_every_configuration_gives_the_no_cache_tokens(tmp_path):
    """The multi-turn job with the mamba kind beside the llama: radix, host and storage hits all give the no-cache
    tokens (the benchmark checks them), and the hits are real."""
    argv = [*SMALL, "--no-warm", "--model-kind", "llama,mamba", "--page-size", str(PAGE), "--device-tokens", "512"]
    assert multiturn.run(parse([*argv, "--report-dir", str(tmp_path)])) == 0
    table = json.loads(Path(tmp_path / "kinds.json").read_text())
    row = {k["kind"]: k for k in table["kinds"]}["mamba"]
    assert row["tokens_identical"]
    report = json.loads(Path(tmp_path / "mamba" / "report.json").read_text())
    storage = {c["config"]: c for c in report["configs"]}["hicache+storage"]
    assert sum(storage["hit_tokens"].values()) > 0, storage["hit_tokens"]


def test_a_warm_request_resumes_from_the_state_the_cold_one_left(tmp_path):
    """From the host and from storage after a restart: the state in the page where the warm request resumes is
    byte-equal to the cold run's, and the tokens are the cold run's."""
    model = _model()
    prompts = [_prompt(1), _prompt(2)]
    cfg = HiCacheConfig(
        page_size=PAGE,
        hicache_ratio=4,
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(tmp_path), "prefetch_threshold": 64},
        hicache_storage_prefetch_policy="wait_complete",
    )

    def state(engine, r, cached):
        """Each Mamba layer's state in the page of the request's last cached token."""
        region = mamba._region(r.slots(), cached - 1, PAGE)
        return [torch.cat([x.reshape(-1) for x in mamba._read(engine.pool, i, region, model.config)]) for i in (0, 2)]

    engine = Engine(model, cfg, "hicache+storage", device_tokens=PAGE * 4, max_running=1)
    try:
        cold = engine.generate([Request(f"c{i}", p, 6) for i, p in enumerate(prompts)])
        # each prompt pushed the other off the device: the host serves them now
        host = engine.generate([Request(f"h{i}", p, 6) for i, p in enumerate(prompts)])
        assert [r.output for r in host] == [r.output for r in cold]
        assert all(r.cached["host"] == 3 * PAGE for r in host), [r.cached for r in host]
        engine.flush()
    finally:
        engine.close()
    restarted = Engine(model, cfg, "hicache+storage", device_tokens=PAGE * 4, max_running=1)
    try:
        stored = restarted.generate([Request("s0", prompts[0], 6)])[0]
        assert stored.cached["storage"] == 3 * PAGE and stored.output == cold[0].output
        warm_state = state(restarted, stored, 3 * PAGE)
    finally:
        restarted.close()
    reference = Engine(model, HiCacheConfig(page_size=PAGE), "radix", device_tokens=PAGE * 4, max_running=1)
    try:
        first = reference.generate([Request("r", prompts[0][: 3 * PAGE + 1], 1)])[0]  # one prefill, from zero
        cold_state = state(reference, first, 3 * PAGE)
    finally:
        reference.close()
    for got, want in zip(warm_state, cold_state):
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_a_cache_that_kept_the_kv_but_not_the_state_would_serve_other_tokens(monkeypatch):
    """The control: warm requests that resume from a zero state (what a cache of attention KV alone would give)
    answer differently, so the state in the page is what makes the warm tokens right."""
    model = _model()
    prompt = _prompt(3)
    engine = Engine(model, HiCacheConfig(page_size=PAGE), "radix", device_tokens=PAGE * 8, max_running=1)
    try:
        cold = engine.generate([Request("a", prompt, 8)])[0]
        warm = engine.generate([Request("b", prompt, 8)])[0]
        assert warm.cached["device"] == 3 * PAGE and warm.output == cold.output
        real = mamba._read
        monkeypatch.setattr(mamba, "_read", lambda *a: tuple(torch.zeros_like(x) for x in real(*a)))
        lost = engine.generate([Request("c", prompt, 8)])[0]
    finally:
        engine.close()
    assert lost.cached["device"] == 3 * PAGE and lost.output != cold.output


def test_the_mixers_change_the_tokens():
    """The same model with its Mamba layers' output projections zeroed answers otherwise: the mixers count."""
    model = _model()
    prompt = _prompt(4, 80)
    engine = Engine(model, HiCacheConfig(page_size=PAGE), "none", device_tokens=PAGE * 4, max_running=1)
    try:
        with_mixers = engine.generate([Request("a", prompt, 8)])[0].output
        for i in (0, 2):
            model.layers[i]["m_out"] = torch.zeros_like(model.layers[i]["m_out"])
        without = engine.generate([Request("b", prompt, 8)])[0].output
    finally:
        engine.close()
    assert with_mixers != without


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"layer_types": (LINEAR, FULL, LINEAR, FULL)}, "give all of mamba_heads"),
        (
            {
                "mamba_heads": 8,
                "mamba_head_dim": 16,
                "mamba_groups": 3,
                "mamba_state": 8,
                "mamba_conv": 4,
                "layer_types": (LINEAR, FULL, LINEAR, FULL),
            },
            "must divide mamba_heads",
        ),
        ({**attention_fields("mamba", 4, 0), "layer_types": None}, "names no linear_attention layer"),
        ({**attention_fields("mamba", 4, 0), "sliding_window": 8}, "not sliding-window"),
        ({**attention_fields("mamba", 4, 0), "kv_dtype": torch.float8_e4m3fn}, "not fp8"),
        ({"partial_rotary_factor": 0.1}, "partial_rotary_factor=0.1"),
    ],
)
def test_a_config_that_cannot_be_is_refused(fields, says):
    with pytest.raises(ConfigError, match=says):
        ModelConfig(**SHAPE, head_dim=16, **fields)


def test_what_the_engine_cannot_serve_is_refused_with_the_fix(tmp_path):
    model = _model()
    with pytest.raises(ConfigError, match=r"state is 5824 bytes .* 2048 bytes at --page-size 16 .* --page-size 46"):
        Engine(model, HiCacheConfig(page_size=16), "radix", device_tokens=256)
    with pytest.raises(ConfigError, match="Mamba models at --tp-size 1"):
        check_divisible(model.config, 2)
    cfg = HiCacheConfig(
        page_size=PAGE,
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(tmp_path), "codec": "fp8"},
    )
    with pytest.raises(ConfigError, match=r'"codec": "fp8" .*mamba2-f32state/page'):
        Engine(model, cfg, "hicache+storage", device_tokens=PAGE * 4)
