"""The reference engine's float32 path (``--compute-dtype float32``): the same model as float64's to float32's
precision, attention by one fused kernel that equals the explicit float64 one, its own fingerprint (its KV differs in
the last bits), and a benchmark that counts token agreement instead of failing on near ties."""

import argparse
import json
import os
import subprocess
import sys

import torch

from hicache_core.bench import multiturn
from hicache_core.config import HiCacheConfig
from hicache_core.engine import Engine, ModelConfig, Request, TinyLlama
from hicache_core.engine.model_config import COMPUTE_DTYPES

SHAPE = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def test_fused_float32_attention_equals_the_explicit_float64_one():
    """Queries at the last n of T positions (a cached prefix of T - n), grouped KV heads: the fast path's
    scaled_dot_product_attention, in blocks of ATTN_BLOCK queries, gives the explicit softmax(QK^T)V of the float64
    path."""
    c = ModelConfig(vocab_size=64, **SHAPE)
    f64, f32 = TinyLlama(c), TinyLlama(c).with_compute_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    for n, total in ((1, 1), (1, 37), (5, 5), (7, 40), (150, 150), (130, 200)):  # past ATTN_BLOCK: blocks
        q = torch.randn(n, c.num_heads, c.head_dim, generator=g, dtype=torch.float64)
        k = torch.randn(total, c.num_kv_heads, c.head_dim, generator=g, dtype=torch.float64)
        v = torch.randn(total, c.num_kv_heads, c.head_dim, generator=g, dtype=torch.float64)
        want = f64._attend(q, k, v)
        got = f32._attend(q.float(), k.float(), v.float())
        assert got.dtype == torch.float32 and got.shape == (n, c.num_heads * c.head_dim)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # a sliding window: the keys of the last n + window - 1 positions only, each block cut where its window starts
    for n, total, window in ((1, 37, 8), (7, 40, 8), (150, 150, 24), (130, 200, 70)):
        q = torch.randn(n, c.num_heads, c.head_dim, generator=g, dtype=torch.float64)
        t = min(total, n + window - 1)
        k, v = (torch.randn(t, c.num_kv_heads, c.head_dim, generator=g, dtype=torch.float64) for _ in range(2))
        want = f64._attend(q, k, v, total, window)
        got = f32._attend(q.float(), k.float(), v.float(), total, window)
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


def _with_biases(model: TinyLlama) -> TinyLlama:
    """The model with biases on q, k and v only (as Qwen's checkpoints have), drawn at random."""
    g = torch.Generator().manual_seed(5)
    layers = [dict(p) for p in model.layers]
    for p in layers:
        for name in ("wq", "wk", "wv"):
            p[name + "_b"] = torch.randn(p[name].shape[1], generator=g, dtype=p[name].dtype)
    weights = {"embed": model.embed, "layers": layers, "final_norm": model.final_norm, "lm_head": model.lm_head}
    return TinyLlama(model.config, weights=weights)


def _logits(model: TinyLlama, prompt: list[int]) -> torch.Tensor:
    """The last token's logits after a prefill of ``prompt`` then one decode step: (2, vocab)."""
    from hicache_core.memory import DevicePool

    pool = DevicePool(model.config.kv_spec(), 64, 8, "cpu")
    slots = torch.arange(len(prompt) + 1)
    first = model.forward(pool, [(torch.tensor(prompt[:-1]), slots[:-2], slots[:-2])])
    step = model.forward(pool, [(torch.tensor(prompt[-1:]), slots[-2:-1], slots[:-1])])
    return torch.cat([first, step])


def test_float32_runs_its_projections_through_onednn_fused_and_gets_the_plain_matmul_result():
    """On CPU the float32 path runs q/k/v and gate/up as one oneDNN matmul each (MKL's sgemm runs its AVX2
    kernels on AMD CPUs: 2.3x slower on this project's machines). The fused weights must be the model's own: the
    per-name matrices become views of them, biases (here on q/k/v only) ride along, and the logits equal the
    unfused x @ w path's to float32 precision."""
    from hicache_core.engine import ops as model_mod

    assert model_mod.ONEDNN is not None, (
        "torch.ops.mkldnn._linear_pointwise is missing or failed its probe in this torch build: the float32 path "
        "fell back to MKL's matmul (2.3x slower on AMD CPUs)"
    )
    c = ModelConfig(vocab_size=256, **SHAPE)
    f64 = _with_biases(TinyLlama(c))
    f32 = f64.with_compute_dtype(torch.float32)
    assert f32._fused is not None and f64._fused is None  # float64 keeps its bit-stable x @ w
    for p64, p32, fused in zip(f64.layers, f32.layers, f32._fused):
        assert set(p32) == set(p64)
        for name, w in p64.items():
            torch.testing.assert_close(p32[name].double(), w, rtol=1e-6, atol=1e-7)
        wq = p32["wq"]
        assert wq.untyped_storage().data_ptr() == fused["qkv"][0].untyped_storage().data_ptr()  # a view: not held twice
        assert fused["qkv"][1] is not None and fused["gate_up"][1] is None
    prompt = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    got = _logits(f32, prompt)
    plain = f64.with_compute_dtype(torch.float32)
    plain._fused = None  # the x @ w path over the same weights
    torch.testing.assert_close(got, _logits(plain, prompt), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), _logits(f64, prompt), rtol=1e-3, atol=1e-3)


def test_keep_activations_in_heap_stops_the_page_faults_of_each_op(tmp_path):
    """glibc hands activations over a few hundred KiB out by mmap and returns them on free, so each op's output is
    faulted in afresh; the model tells malloc to keep them in its heap (``$HICACHE_MALLOC_TUNE=0`` leaves malloc
    alone). Counted in fresh processes: minor page faults of a forward pass after a warm-up."""
    script = tmp_path / "faults.py"
    script.write_text(
        "import resource, torch\n"
        "from hicache_core.engine import ModelConfig, TinyLlama\n"
        "from hicache_core.memory import DevicePool\n"
        "torch.set_num_threads(1)\n"
        "c = ModelConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9,\n"
        "                num_kv_heads=3, head_dim=64, compute_dtype=torch.float32)  # SmolLM2-135M's shapes\n"
        "m = TinyLlama(c)\n"
        "def run():\n"
        "    pool = DevicePool(c.kv_spec(), 1024, 8, 'cpu')\n"
        "    for n in (512, 7):\n"
        "        s = torch.arange(n)\n"
        "        m.forward(pool, [(torch.randint(0, 512, (n,)), s, s)])\n"
        "run()\n"
        "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(3):\n"
        "    run()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n"
    )
    faults = {}
    for tune in ("1", "0"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env["HICACHE_MALLOC_TUNE"] = tune
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        faults[tune] = int(out.stdout.split()[-1])
    assert faults["1"] * 4 < faults["0"], faults
