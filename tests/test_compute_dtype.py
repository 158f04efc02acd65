"""The reference engine's float32 path (``--compute-dtype float32``): the same model as float64's to float32's
precision, attention by one fused kernel that equals the explicit float64 one, its own fingerprint (its KV differs in
the last bits), and a benchmark that counts token agreement instead of failing on near ties."""

import argparse
import json

import torch

from hicache_core.bench import multiturn
from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama
from hicache_core.engine.model import COMPUTE_DTYPES

SHAPE = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def test_fused_float32_attention_equals_the_explicit_float64_one():
    """Queries at the last n of T positions (a cached prefix of T - n), grouped KV heads: the fast path's
    scaled_dot_product_attention gives the explicit softmax(QK^T)V of the float64 path."""
    c = ModelConfig(vocab_size=64, **SHAPE)
    f64, f32 = TinyLlama(c), TinyLlama(c).with_compute_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    for n, total in ((1, 1), (1, 37), (5, 5), (7, 40)):
        q = torch.randn(n, c.num_heads, c.head_dim, generator=g, dtype=torch.float64)
        k = torch.randn(total, c.num_kv_heads, c.head_dim, generator=g, dtype=torch.float64)
        v = torch.randn(total, c.num_kv_heads, c.head_dim, generator=g, dtype=torch.float64)
        want = f64._attend(q, k, v)
        got = f32._attend(q.float(), k.float(), v.float())
        assert got.dtype == torch.float32 and got.shape == (n, c.num_heads * c.head_dim)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_float32_model_is_the_float64_model_to_float32_precision():
    c = ModelConfig(vocab_size=256, **SHAPE)
    f64 = TinyLlama(c)
    f32 = TinyLlama(ModelConfig(vocab_size=256, compute_dtype=torch.float32, **SHAPE))
    assert f32.embed.dtype == torch.float32 and all(w.dtype == torch.float32 for w in f32.layers[0].values())
    torch.testing.assert_close(f32.lm_head.double(), f64.lm_head, rtol=1e-6, atol=1e-7)  # same draws
    cfg = HiCacheConfig(page_size=8, hicache_io_backend="direct")
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    outs = []
    for m in (f64, f32):
        e = Engine(m, cfg, "none", device_tokens=128)
        outs.append(e.generate([Request("a", prompt, 8)])[0].output)
        e.close()
    assert outs[0] == outs[1]  # no near tie in these 8 greedy steps of this seeded model


def test_fingerprint_carries_a_non_default_compute_dtype():
    base = ModelConfig(**SHAPE)
    f32 = ModelConfig(compute_dtype=torch.float32, **SHAPE)
    assert base.fingerprint.startswith("random-") and "+act" not in base.fingerprint  # float64 keys: unchanged
    assert f32.fingerprint == base.fingerprint + "+act-float32"
    assert set(COMPUTE_DTYPES) == {"float64", "float32"}


def test_bench_multiturn_float32_counts_token_agreement(tmp_path, capsys):
    from test_engine import SMALL

    p = argparse.ArgumentParser()
    multiturn.add_arguments(p)
    args = p.parse_args(
        SMALL + ["--no-warm", "--compute-dtype", "float32", "--configs", "radix,hicache", "--report-dir", str(tmp_path)]
    )
    assert multiturn.run(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    agree = report["summary"]["requests_with_reference_tokens"]
    assert set(agree) == {"none", "radix", "hicache"}
    assert agree["none"] == [12, 12]  # 4 clients x 3 rounds, the reference against itself
    assert all(0 <= a <= n == 12 for a, n in agree.values())
    assert report["args"]["compute_dtype"] == "float32"
