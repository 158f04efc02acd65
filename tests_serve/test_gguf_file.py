"""``--model-path FILE.gguf``: a llama GGUF file loads directly.

The synthetic file here is written with the ``gguf`` package's own writer from a transformers llama, its Q/K rows
in llama.cpp's rope order (llama.cpp's converter reorders them), its tokenizer copied from SmolLM2's GGUF: loading
it must give back transformers' tensors exactly and transformers' greedy tokens, which fails if the reordering is
not undone. Bad files fail with a message, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_real_checkpoint import smollm2_gguf

from conftest import REPO, hf_generate, serve

N = 12


def llama_cpp_order(w, heads: int):
    """Hugging Face's Q/K rows (per head: both halves) in llama.cpp's order (per head: adjacent pairs)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, *, arch: str = "llama", tokenizer_model: str = "gpt2") -> Path:
    import gguf

    smol = gguf.GGUFReader(str(smollm2_gguf()))
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(smol.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(smol.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(smol.fields["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            base, kind = rest.rsplit(".", 1)
            if base == "self_attn.q_proj":
                a = llama_cpp_order(a, c.num_attention_heads)
            elif base == "self_attn.k_proj":
                a = llama_cpp_order(a, c.num_key_value_heads)
            out = f"blk.{i}.{names[base]}.{kind}"
        else:
            out = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF file, transformers model, SmolLM2's tokenizer): a random 2-layer GQA llama on SmolLM2's vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gg = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gg.parent, gguf_file=gg.name)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        tie_word_embeddings=False,
        rope_theta=50000.0,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model), model, tok


def test_a_gguf_file_gives_back_transformers_tensors_and_tokens(tmp_path, tiny):
    import torch

    from hicache_core.engine import gguf

    path, model, tok = tiny
    cfg, tensors = gguf.read(path)
    assert cfg["rope_theta"] == 50000.0 and not cfg["tie_word_embeddings"]
    want = model.state_dict()
    assert set(tensors) == set(want)
    for name, t in tensors.items():
        assert torch.equal(t, want[name].float()), name  # Q and K only match once llama.cpp's order is undone
    with serve(tmp_path, "--model-path", str(path), "--page-size", "8", "--enable-hierarchical-cache") as s:
        text = "A cache keeps every prefix it has seen, 1234 times over; " * 3
        for _ in range(2):  # the second time the prefix is cached
            out = s.generate({"text": text, "sampling_params": {"max_new_tokens": N, "temperature": 0}})
            assert out["output_ids"] == hf_generate((model, tok), tok(text).input_ids, N)
        assert out["meta_info"]["cached_tokens"] > 0
        assert s.get("/v1/models")["data"][0]["id"] == "tiny"


@pytest.mark.parametrize(
    "make,says",
    [
        (lambda p, m: p.write_bytes(b"not a gguf file at all" * 10), "is not a readable GGUF file"),
        (lambda p, m: p.write_bytes(p.with_name("tiny.gguf").read_bytes()[:4096]), "is not a readable GGUF file"),
        (lambda p, m: write_gguf(p, m, arch="gpt2"), "holds a gpt2 model (general.architecture)"),
        (lambda p, m: write_gguf(p, m, tokenizer_model="llama"), "tokenizer.ggml.model 'llama' is not supported"),
        (None, "no such file"),
    ],
)
def test_bad_gguf_files_fail_clearly(tmp_path, tiny, make, says):
    path, model, _ = tiny
    bad = path.parent / f"bad-{abs(hash(says))}.gguf"
    if make is not None:
        make(bad, model)
    r = subprocess.run(
        [sys.executable, "-m", "hicache_core.cli", "serve", "--port", "0", "--model-path", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert re.match(r"hicache: error", r.stderr), r.stderr
