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
