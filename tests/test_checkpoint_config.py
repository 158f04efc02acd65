"""The checkpoint loader reads every key transformers 4 and 5 write for a llama config, and refuses what it does not
understand, naming the key, instead of computing with a default (a wrong rope theta serves plausible nonsense)."""

from pathlib import Path

import pytest

from hicache_core.engine.checkpoint import config_from_dict
from hicache_core.errors import ConfigError

BASE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
WHERE = Path("/ckpt/config.json")


def cfg(**kw):
    return config_from_dict({**BASE, **kw}, WHERE, name="ckpt")


def test_rope_from_transformers_5_rope_parameters():
    c = cfg(rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, head_dim=32)
    assert c.rope_theta == 100000.0 and c.rope_scaling is None and c.head_dim == 32


def test_rope_from_transformers_4_top_level_and_rope_scaling():
    c = cfg(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert c.rope_theta == 500000.0 and c.rope_scaling["factor"] == 8.0


def test_scaling_inside_rope_parameters_is_used():
    c = cfg(rope_parameters={"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0})
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize(
    "extra, says",
    [
        ({}, "no rope_theta"),
        (
            {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}},
            "rope_parameters.rope_type 'yarn' is not supported",
        ),
        ({"rope_theta": 1e4, "rope_scaling": {"type": "dynamic"}}, "rope_scaling 'dynamic' is not supported"),
        ({"rope_parameters": 5}, "rope_parameters=5 is not an object"),
        ({"rope_theta": 1e4, "hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"rope_theta": 1e4, "pretraining_tp": 2}, "pretraining_tp=2 is not supported"),
    ],
)
def test_what_is_not_understood_is_refused_naming_the_key(extra, says):
    with pytest.raises(ConfigError, match=says):
        cfg(**extra)


def test_sliding_windows_as_transformers_applies_them():
    """Mistral windows every layer; Qwen2 only with use_sliding_window, on the layers layer_types names (or, without
    them, from max_window_layers on); Llama has none."""
    four = {"num_hidden_layers": 4, "rope_theta": 1e4}
    mistral = cfg(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=32, **four)
    assert mistral.attention_kind == "swa" and mistral.window(0) == 32
    assert cfg(model_type="mistral", sliding_window=None, **four).attention_kind == "full"
    qwen = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], sliding_window=32, **four)
    assert cfg(**qwen, use_sliding_window=False).attention_kind == "full"
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    hybrid = cfg(**qwen, use_sliding_window=True, layer_types=types)
    assert hybrid.layer_types == tuple(types) and [hybrid.window(i) for i in range(4)] == [None, 32, None, 32]
    derived = cfg(**qwen, use_sliding_window=True, max_window_layers=3)
    assert [derived.window(i) for i in range(4)] == [None, None, None, 32]
    assert cfg(sliding_window=32, **four).attention_kind == "full"  # llama has no windows


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"model_type": "mistral", "sliding_window": -4}, "sliding_window=-4 is not a whole number"),
        (
            {"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True, "layer_types": ["x", "y"]},
            "layer_types=.* must name each of the 2 layers",
        ),
        ({"model_type": "gemma3", "architectures": ["Gemma3ForCausalLM"]}, "the supported architectures are"),
    ],
)
def test_windows_that_cannot_be_are_refused(extra, says):
    with pytest.raises(ConfigError, match=says):
        cfg(rope_theta=1e4, **extra)


DEEPSEEK = {
    "model_type": "deepseek_v2",
    "architectures": ["DeepseekV2ForCausalLM"],
    "rope_theta": 1e4,
    "head_dim": 16,  # transformers writes the rotary part's width here; the nope part is qk_nope_head_dim
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 24,
    "v_head_dim": 32,
    "q_lora_rank": None,
    "n_routed_experts": 4,
    "first_k_dense_replace": 2,
}


def test_deepseek_v2s_latent_attention_fields():
    c = cfg(**DEEPSEEK)
    assert (c.is_mla, c.head_dim, c.rope_dim, c.v_head_dim, c.kv_lora_rank, c.q_lora_rank) == (
        True,
        24,
        16,
        32,
        64,
        None,
    )
    assert c.kv_spec().head_dim == 80 and c.kv_spec().is_mla
    assert cfg(**{**DEEPSEEK, "q_lora_rank": 48}).q_lora_rank == 48


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"first_k_dense_replace": 1}, r"layers 1..1 are mixture-of-experts \(first_k_dense_replace=1"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"kv_lora_rank": None}, "bad value"),
    ],
)
def test_deepseek_v2_what_the_engine_does_not_run_is_refused(extra, says):
    with pytest.raises(ConfigError, match=says):
        cfg(**{**DEEPSEEK, **extra})


BAMBA = {
    "model_type": "bamba",
    "architectures": ["BambaForCausalLM"],
    "num_hidden_layers": 4,
    "rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "partial_rotary_factor": 0.5},
    "attn_layer_indices": [1, 3],
    "mamba_n_heads": 8,
    "mamba_d_head": "auto",
    "mamba_expand": 2,
    "mamba_n_groups": 2,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "time_step_limit": [0.0, {"__float__": "Infinity"}],  # as transformers 5 writes infinity
}


def test_bambas_mamba_fields_and_half_rotary():
    c = cfg(**BAMBA)
    assert c.layer_types == ("linear_attention", "full_attention", "linear_attention", "full_attention")
    assert (c.mamba_heads, c.mamba_head_dim, c.mamba_groups, c.mamba_state, c.mamba_conv) == (8, 16, 2, 16, 4)
    assert c.rope_dim == 8 and c.attention_kind == "mamba" and c.kv_spec().kv_format == "mamba2-f32state/page"
    assert cfg(rope_theta=1e4, partial_rotary_factor=0.5).rope_dim == 8  # a llama's partial rotary is no longer lost


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"time_step_limit": [0.0, 10.0]}, r"time_step_limit=\[0.0, 10.0\] is not supported"),
        ({"attn_layer_indices": [1, 9]}, r"attn_layer_indices=\[1, 9\] must list layer numbers 0..3"),
        ({"mamba_n_groups": 3}, "must divide mamba_heads"),
    ],
)
def test_bamba_what_the_engine_does_not_run_is_refused(extra, says):
    with pytest.raises(ConfigError, match=says):
        cfg(**{**BAMBA, **extra})
