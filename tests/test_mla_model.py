"""Multi-head latent attention (DeepSeek-V2's MLA) in the reference engine, on the random model (``--model-kind
mla``; tests_serve/test_window_models.py checks a DeepSeek-V2 checkpoint against transformers): each token keeps one
latent vector per layer in every tier, every cache configuration gives the no-cache tokens in bfloat16 and fp8, and
what cannot be is refused naming the field."""

import json

import attrs
import pytest
import torch
from test_engine import SMALL, parse

from hicache_core.bench import multiturn
from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama
from hicache_core.engine.model_config import MLA_SHAPE, attention_fields
from hicache_core.engine.tp import check_divisible
from hicache_core.errors import ConfigError
from hicache_core.registry.opening import make_storage_config

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize(
    "dtype,layout",
    [("auto", "layer_first"), ("auto", "page_first"), ("fp8_e4m3", "page_first_direct")],
)
def test_every_configuration_gives_the_no_cache_tokens_moving_one_latent_per_token(tmp_path, dtype, layout):
    argv = [*SMALL, "--no-warm", "--model-kind", "mla", "--kv-cache-dtype", dtype, "--hicache-mem-layout", layout]
    extra = json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 16})
    argv += ["--hicache-storage-backend-extra-config", extra, "--report-dir", str(tmp_path)]
    assert multiturn.run(parse(argv)) == 0  # every configuration's tokens are its no-cache run's
    configs = {c["config"]: c for c in json.loads((tmp_path / "report.json").read_text())["configs"]}
    r = configs["hicache+storage"]
    assert r["hit_tokens"]["host"] + r["hit_tokens"]["storage"] > 0 and r["backuped_tokens"] > 0
    layers = parse(SMALL).num_layers or ModelConfig().num_layers
    latent = MLA_SHAPE["kv_lora_rank"] + MLA_SHAPE["qk_rope_head_dim"]
    # one latent per token and layer, no K and V: bfloat16's 2 bytes a value, or fp8's 1 plus its 4-byte scale
    per_token = layers * (latent * 2 if dtype == "auto" else latent + 4)
    assert r["transfer_bytes"]["storage_set"] == r["backuped_tokens"] * per_token


def test_the_latent_is_what_the_pools_hold_and_a_cached_prefix_keeps_the_tokens():
    c = ModelConfig(**SHAPE, head_dim=16, **attention_fields("mla", 2, 0, 16))
    spec = c.kv_spec()
    assert (spec.is_mla, spec.head_num, spec.head_dim, spec.num_kv) == (True, 1, 160, 1)
    assert c.name == "tiny-mla-h64-l2-q4-r128-d16-rope32-v16-seed0"
    llama = ModelConfig(**SHAPE, head_dim=16)
    assert c.fingerprint != llama.fingerprint
    ns = [make_storage_config(HiCacheConfig(page_size=16), m.kv_spec()).namespace for m in (c, llama)]
    assert ns[0].tag != ns[1].tag
    prompt = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    outs = {}
    for name, config in (("mla", c), ("q_lora", attrs.evolve(c, q_lora_rank=24))):
        model = TinyLlama(config)
        assert ("wq_a" in model.layers[0]) == (name == "q_lora") and "wk" not in model.layers[0]
        engine = Engine(model, HiCacheConfig(page_size=16), "radix", device_tokens=512, max_running=1)
        try:
            first = engine.generate([Request("a", prompt, 8)])[0]
            again = engine.generate([Request("b", prompt, 8)])[0]
            assert engine.pool.kv_buffer.shape == (2, 512, 1, 160)  # (layers, tokens, 1, latent): no K/V pair
        finally:
            engine.close()
        assert again.cached["device"] >= 144 and again.output == first.output, name
        outs[name] = first.output
    assert outs["mla"] != outs["q_lora"]


@pytest.mark.parametrize(
    "fields,says",
    [
        ({"kv_lora_rank": 32}, "an MLA model gives all of kv_lora_rank, qk_rope_head_dim, v_head_dim"),
        ({"kv_lora_rank": 32, "qk_rope_head_dim": 7, "v_head_dim": 16}, "qk_rope_head_dim must be even"),
        ({"kv_lora_rank": 0, "qk_rope_head_dim": 8, "v_head_dim": 16}, "kv_lora_rank must be a whole number > 0"),
        (
            {"kv_lora_rank": 32, "qk_rope_head_dim": 8, "v_head_dim": 16, "sliding_window": 8},
            "an MLA model with sliding-window layers is not supported",
        ),
    ],
)
def test_an_mla_config_that_cannot_be_is_refused(fields, says):
    with pytest.raises(ConfigError, match=says):
        ModelConfig(**SHAPE, **fields)


def test_tensor_parallel_mla_is_refused_with_the_reason():
    c = ModelConfig(**SHAPE, **attention_fields("mla", 2, 0))
    with pytest.raises(ConfigError, match="--tp-size 2: the reference engine runs MLA models at --tp-size 1"):
        check_divisible(c, 2)
    check_divisible(c, 1)
