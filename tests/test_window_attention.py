"""Sliding-window and hybrid attention in the reference engine (the random model; tests_serve/test_window_models.py
checks the same against transformers on Mistral and Qwen2 checkpoints): every cache configuration of the
multi-turn benchmark gives the no-cache tokens for each model kind, the float32 path's blocked attention cuts the
window where the float64 path does, and a config that cannot be one is refused naming the field."""

import json
from pathlib import Path

import attrs
import pytest
import torch
from test_engine import SMALL, parse

from hicache_core.bench import multiturn
from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama
from hicache_core.engine.model_config import FULL, SLIDING, attention_fields
from hicache_core.errors import ConfigError

SHAPE = dict(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)


def test_every_configuration_gives_the_no_cache_tokens_for_each_model_kind(tmp_path, capsys):
    """Round 2 and 3 prompts (~140-200 tokens) are several 24-token windows long; each kind's report shows its
    caches' gain and the kinds' table compares them (mla: DeepSeek-V2's latent attention, tests/test_mla_model.py)."""
    argv = [*SMALL, "--no-warm", "--model-kind", "llama,swa,hybrid,mla", "--sliding-window", "24"]
    assert multiturn.run(parse([*argv, "--report-dir", str(tmp_path)])) == 0  # and every kind's tokens are no-cache's
    table = json.loads(Path(tmp_path / "kinds.json").read_text())
    assert [k["kind"] for k in table["kinds"]] == ["llama", "swa", "hybrid", "mla"] and table["sliding_window"] == 24
    for row in table["kinds"]:
        report = json.loads(Path(tmp_path / row["kind"] / "report.json").read_text())
        assert row["tokens_identical"] and all(report["summary"]["outputs_identical"].values())
        assert set(row["rounds2plus_gain_vs_none"]) == {"radix", "hicache", "hicache+storage"}
        storage = {c["config"]: c for c in report["configs"]}["hicache+storage"]
        assert storage["hit_tokens"]["device"] + storage["hit_tokens"]["host"] > 0
    names = {
        json.loads(Path(tmp_path / k / "report.json").read_text())["args"]["model_kind"] for k in ("swa", "hybrid")
    }
    assert names == {"swa", "hybrid"}
    assert "per model kind" in capsys.readouterr().out


def test_the_window_changes_the_tokens_and_a_cached_prefix_keeps_them():
    """A windowed model's tokens differ from the same weights' with full attention (the window is exercised), and
    a prompt served from the radix cache (its prefix cached, its window reaching back into the cached pages) gives
    the no-cache tokens."""
    prompt = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    outs = {}
    for kind in ("llama", "swa", "hybrid"):
        model = TinyLlama(ModelConfig(vocab_size=512, **SHAPE, **attention_fields(kind, 4, 24)))
        engine = Engine(model, HiCacheConfig(page_size=16), "radix", device_tokens=512, max_running=1)
        try:
            first = engine.generate([Request("a", prompt, 8)])[0]
            again = engine.generate([Request("b", prompt, 8)])[0]
        finally:
            engine.close()
        assert again.cached["device"] >= 144 and again.output == first.output, kind
        outs[kind] = first.output
    assert outs["swa"] != outs["llama"] and outs["hybrid"] not in (outs["llama"], outs["swa"])


def test_float32_blocked_attention_cuts_the_window_as_float64_does():
    """float32 attention runs in blocks of 64 queries, each over the keys it may see; with a 24-token window the
    blocks start past the first key, and the logits must still be float64's (to float32 precision)."""
    c = ModelConfig(vocab_size=512, **SHAPE, **attention_fields("hybrid", 4, 24))
    f64 = TinyLlama(c)
    f32 = f64.with_compute_dtype(torch.float32)
    prompt = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(2))

    def logits(model):
        from hicache_core.memory import DevicePool

        pool = DevicePool(attrs.evolve(c, kv_dtype=torch.float32).kv_spec(), 256, 16, "cpu")
        slots = torch.arange(len(prompt))
        return model.forward(pool, [(prompt, slots, slots)])

    torch.testing.assert_close(logits(f32).double(), logits(f64), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"sliding_window": 0}, "sliding_window must be a whole number"),
        ({"sliding_window": 8, "layer_types": (FULL, SLIDING)}, "must name each of the 4 layers"),
        ({"sliding_window": 8, "layer_types": (FULL, "local", FULL, FULL)}, "must name each of the 4 layers"),
        ({"layer_types": (FULL, SLIDING, FULL, FULL)}, "no sliding_window"),
    ],
)
def test_a_config_that_cannot_be_is_refused(fields, says):
    with pytest.raises(ConfigError, match=says):
        ModelConfig(**SHAPE, **fields)


def test_bad_model_kind_flags_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--model-kind: rwkv; choose from llama, swa, hybrid, mla, mamba"):
        multiturn.run(parse([*SMALL, "--model-kind", "rwkv"]))
    with pytest.raises(ConfigError, match="a --model-path checkpoint's config.json says its own attention"):
        multiturn.run(parse([*SMALL, "--model-kind", "swa", "--model-path", str(tmp_path)]))


def test_random_fingerprints_of_full_models_are_unchanged_and_windows_change_them():
    """The new fields stay out of a full-attention model's fingerprint: these are the fingerprints the same configs
    had before sliding windows existed, so their stored pages keep their namespace. A window, or another layer
    pattern, is another model."""
    base = ModelConfig(**SHAPE)
    assert base.fingerprint == "random-32a41a65188d45dba799bdf1"
    assert ModelConfig().fingerprint == "random-db171e2702c6a4b573d68bac"
    swa = ModelConfig(**SHAPE, **attention_fields("swa", 4, 24))
    hybrid = ModelConfig(**SHAPE, **attention_fields("hybrid", 4, 24))
    assert len({base.fingerprint, swa.fingerprint, hybrid.fingerprint}) == 3
    assert swa.name.endswith("-swa24") and hybrid.name.endswith("-swa24-full0.2")
