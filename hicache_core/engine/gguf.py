"""Load a llama GGUF file (llama.cpp's format) directly: its config, weights and tokenizer, no conversion step.

``hicache serve --model-path model.gguf`` reads the file with the ``gguf`` package (``pip install
'hicache-core[gguf]'``): the metadata becomes a llama config (checked by the same rules as a Hugging Face
``config.json``), every tensor is dequantized to float32 by ``gguf`` and renamed to its Hugging Face name, and the
tokenizer is rebuilt from ``tokenizer.ggml.*`` (byte-level BPE; its chat template from ``tokenizer.chat_template``).

One fact of the format matters for correctness: llama.cpp rotates adjacent pairs of a head's dimensions, Hugging
Face rotates the two halves, so llama.cpp's converter reorders the rows of every head of Q and K. Loading undoes
that reordering; without it rope rotates the wrong coordinates and the model speaks nonsense.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from hicache_core.errors import ConfigError

# llama.cpp's tensor names -> Hugging Face's (per layer, then global)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# byte-level pre-tokenizers by ``tokenizer.ggml.pre``: GPT-2's split, with digits one by one where llama.cpp
# splits them so, or llama 3's split
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    None: "gpt2",
    "default": "gpt2",
    "gpt2": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "smaug-bpe": "llama3",
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def _reader(path: Path) -> Any:
    """The file's ``GGUFReader``, opened once per (path, size, mtime): parsing the metadata of a file with a
    50k-token vocabulary takes seconds, and a start reads config, weights and tokenizer."""
    try:
        st = path.stat()
    except OSError:
        raise ConfigError(f"--model-path {path}: no such file") from None
    return _open(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open(name: str, size: int, mtime_ns: int) -> Any:
    path = Path(name)
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError(
            "--model-path: a .gguf file needs the gguf package: pip install 'hicache-core[gguf]'"
        ) from None
    if not path.is_file():
        raise ConfigError(f"--model-path {path}: not a file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error/... for a truncated or foreign file
        raise ConfigError(f"--model-path: {path} is not a readable GGUF file: {e}") from None


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_dict(reader: Any, where: Path) -> dict:
    """The file's metadata as the ``config.json`` transformers would write for it."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(
            f"--model-path: {where} holds a {arch or 'unknown'} model (general.architecture); only "
            "llama GGUF files are supported"
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ConfigError(
            f"--model-path: {where} carries rope_freqs.weight (llama 3.1 rope scaling baked into a "
            "tensor), which is not supported; convert it to a Hugging Face directory"
        )
    m = {
        k: _meta(reader, f"llama.{k}")
        for k in (
            "block_count",
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "attention.value_length",
            "rope.dimension_count",
            "rope.freq_base",
            "attention.layer_norm_rms_epsilon",
            "vocab_size",
            "rope.scaling.type",
            "rope.scaling.factor",
        )
    }
    for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if m[k] is None:
            raise ConfigError(f"--model-path: {where} lacks llama.{k}")
    heads, hidden = int(m["attention.head_count"]), int(m["embedding_length"])
    head_dim = int(m["attention.key_length"] or hidden // heads)
    for k in ("attention.value_length", "rope.dimension_count"):
        if m[k] is not None and int(m[k]) != head_dim:
            raise ConfigError(
                f"--model-path: {where}: llama.{k}={m[k]} differs from the head dimension {head_dim}; "
                "only full-rotary llama heads are supported"
            )
    vocab = m["vocab_size"] or len(reader.fields["tokenizer.ggml.tokens"].data)
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "num_hidden_layers": int(m["block_count"]),
        "hidden_size": hidden,
        "intermediate_size": int(m["feed_forward_length"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m["attention.head_count_kv"] or heads),
        "head_dim": head_dim,
        # the GGUF spec makes freq_base optional with llama.cpp's 10000 as the value when absent
        "rope_theta": float(m["rope.freq_base"] or 10000.0),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(m["context_length"] or 2048),
        "torch_dtype": "float32",
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    if m["attention.layer_norm_rms_epsilon"] is not None:
        cfg["rms_norm_eps"] = float(m["attention.layer_norm_rms_epsilon"])
    kind = m["rope.scaling.type"]
    if kind not in (None, "none"):
        if kind != "linear":
            raise ConfigError(f"--model-path: {where}: llama.rope.scaling.type {kind!r} is not supported (linear is)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(m["rope.scaling.factor"] or 1.0)}
    return cfg


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for Q/K: within each head it stores the rows as (pair index, half) where
    Hugging Face stores (half, pair index)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(reader: Any, cfg: dict, where: Path) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized to float32 and under its Hugging Face name."""
    from gguf import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")  # "blk.3.attn_q" + "weight"
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{kind}"
        elif base in GLOBAL_NAMES:
            name = f"{GLOBAL_NAMES[base]}.{kind}"
        else:
            raise ConfigError(f"--model-path: {where} has a tensor {t.name!r} a llama model does not have")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise ConfigError(
                f"--model-path: {where}: {t.name} is {t.tensor_type.name}, which gguf cannot dequantize ({e})"
            ) from None
        if parts[-1] == "attn_q":
            w = _unpermute(w, cfg["num_attention_heads"])
        elif parts[-1] == "attn_k":
            w = _unpermute(w, cfg["num_key_value_heads"])
        out[name] = torch.from_numpy(w.copy() if not w.flags.writeable else np.ascontiguousarray(w))
    return out


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    reader = _reader(path)
    cfg = config_dict(reader, path)
    return cfg, tensors(reader, cfg, path)


def read_config(path: Path) -> dict:
    return config_dict(_reader(path), path)


def tokenizer(path: Path) -> tuple[Any, dict[str, Any]]:
    """The file's byte-level BPE as a ``tokenizers.Tokenizer`` and what the model says of its special tokens and
    chat template (``bos_token``, ``eos_token``, ``chat_template``, ``eos_ids``): engine/tokenizer.py makes them
    one tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    reader = _reader(path)
    model, pre = _meta(reader, "tokenizer.ggml.model"), _meta(reader, "tokenizer.ggml.pre")
    if model != "gpt2":
        raise ConfigError(
            f"--model-path: {path}: tokenizer.ggml.model {model!r} is not supported (byte-level BPE, "
            "'gpt2', is); convert the file to a Hugging Face directory with transformers"
        )
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(
            f"--model-path: {path}: tokenizer.ggml.pre {pre!r} is not supported (one of "
            f"{', '.join(sorted(k for k in PRE_TOKENIZERS if k))})"
        )
    tokens: list[str] = list(_meta(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_meta(reader, "tokenizer.ggml.token_type", []) or [])
    merges = [tuple(m.split(" ", 1)) for m in (_meta(reader, "tokenizer.ggml.merges") or [])]
    tok = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    split = PRE_TOKENIZERS[pre]
    if split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, kind in enumerate(types) if kind == CONTROL]
    )
    tok.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, kind in enumerate(types) if kind == USER_DEFINED]
    )

    def token(key: str) -> Optional[str]:
        i = _meta(reader, f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    if _meta(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = int(_meta(reader, "tokenizer.ggml.bos_token_id"))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
    eos_ids = frozenset({int(_meta(reader, "tokenizer.ggml.eos_token_id"))} if eos is not None else ())
    chat = _meta(reader, "tokenizer.chat_template")
    return tok, {"bos_token": bos, "eos_token": eos, "chat_template": chat, "eos_ids": eos_ids}
