"""Load a local Hugging Face checkpoint of the llama family (Llama; Mistral and Qwen2, with their sliding-window
layers; DeepSeek-V2's dense layers, with its latent attention; Bamba's Mamba-2 mixers beside its attention layers)
or a llama GGUF file (engine/gguf.py) into the reference model.

A model directory holds ``config.json``, the weights as ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and ``tokenizer.json``. Weights are read with ``safetensors`` and kept in the
model's compute dtype (float64 unless ``compute_dtype`` says float32); the KV pool holds the checkpoint's dtype
(float32, bfloat16 or float16).
Every way a directory can fail to be one (missing file, another architecture, a missing tensor, a shape that does
not match the config) is a :class:`~hicache_core.errors.ConfigError` naming the file and what to fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from hicache_core.engine import gguf, mamba
from hicache_core.engine.model import TinyLlama
from hicache_core.engine.model_config import (
    COMPUTE,
    COMPUTE_DTYPES,
    FULL,
    SLIDING,
    ModelConfig,
    attention_fields,
    shape_from_args,
    with_kv_cache_dtype,
)
from hicache_core.errors import ConfigError
from hicache_core.identity import checkpoint_fingerprint

# model_type -> architecture: the llama math, with Mistral's and Qwen2's sliding-window layers (see _windows)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",  # MLA (see _mla), dense MLP layers only
    "bamba": "BambaForCausalLM",  # Mamba-2 mixers beside full-attention layers (engine/mamba.py)
}
# the tensors' names where an architecture's differ from llama's: (MLP prefix, its norm, the final norm)
_NAMES = {"bamba": ("feed_forward", "pre_ff_layernorm", "model.final_layernorm")}
_LLAMA_NAMES = ("mlp", "post_attention_layernorm", "model.norm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"--model-path: {path} is missing (a Hugging Face model directory has config.json, "
            "model.safetensors and tokenizer.json)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--model-path: cannot read {path}: {e}") from None


ROPE_TYPES = ("default", "linear", "llama3")
# config.json keys whose value changes the math; each must have the value the reference model computes with
REQUIRED_VALUES = {"hidden_act": ("silu",), "pretraining_tp": (1,)}


def _rope(cfg: dict, where: Path) -> tuple[float, Optional[dict]]:
    """rope_theta and the scaling dict, from wherever transformers wrote them: ``rope_parameters`` (transformers 5:
    ``{"rope_theta": ..., "rope_type": ..., scaling keys}``) or top-level ``rope_theta`` + ``rope_scaling``
    (transformers 4). Missing theta or an unknown rope type is refused, naming the key: a silent default rotates
    every query and key wrongly and serves plausible nonsense."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"--model-path: {where}: rope_parameters={params!r} is not an object")
    params = dict(params or {})
    theta = params.pop("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ConfigError(
            f"--model-path: {where} gives no rope_theta (neither top level nor in rope_parameters); "
            "add the model's rope_theta to config.json"
        )
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"--model-path: {where}: rope_scaling={scaling!r} is not an object")
    scaling = {**(scaling or {}), **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        key = "rope_parameters.rope_type" if "rope_type" in params else "rope_scaling"
        raise ConfigError(f"--model-path: {where}: {key} {kind!r} is not supported ({', '.join(ROPE_TYPES)} are)")
    return float(theta), (scaling if kind != "default" else None)


def _windows(kind: str, cfg: dict, where: Path) -> dict[str, Any]:
    """sliding_window and layer_types as transformers' model of that type applies them: Mistral windows every layer
    when sliding_window is set; Qwen2 only with use_sliding_window, the layers its layer_types says (or, without
    them, those from max_window_layers on); Llama none."""
    window = cfg.get("sliding_window")
    if kind == "llama" or window is None or (kind == "qwen2" and not cfg.get("use_sliding_window")):
        return {}
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ConfigError(f"--model-path: {where}: sliding_window={window!r} is not a whole number of tokens > 0")
    if kind == "mistral":
        return {"sliding_window": window}  # MistralForCausalLM windows every layer, whatever layer_types says
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        first = int(cfg.get("max_window_layers", n))
        types = [SLIDING if i >= first else FULL for i in range(n)]
    if not isinstance(types, list) or len(types) != n or set(types) - {FULL, SLIDING}:
        raise ConfigError(
            f"--model-path: {where}: layer_types={types!r} must name each of the {n} layers {FULL} or {SLIDING}"
        )
    return {"sliding_window": window, "layer_types": tuple(types)} if SLIDING in types else {}


def _mla(kind: str, cfg: dict, where: Path, scaling: Optional[dict]) -> dict[str, Any]:
    """DeepSeek-V2's latent-attention fields as ModelConfig's (``head_dim``: its qk_nope_head_dim; config.json's own
    head_dim is the rotary part's). Its mixture-of-experts layers and its yarn rope are refused, naming the key."""
    if kind != "deepseek_v2":
        return {}
    layers, dense = int(cfg["num_hidden_layers"]), cfg.get("first_k_dense_replace", 0)
    if cfg.get("n_routed_experts") and int(dense) < layers:
        raise ConfigError(
            f"--model-path: {where}: layers {dense}..{layers - 1} are mixture-of-experts (first_k_dense_replace="
            f"{dense} < num_hidden_layers={layers}); the reference engine runs DeepSeek-V2's dense layers only"
        )
    if scaling is not None:
        raise ConfigError(
            f"--model-path: {where}: DeepSeek-V2 with rope scaling {scaling.get('rope_type', scaling.get('type'))!r}"
            " is not supported (plain rotary only)"
        )
    return {
        "head_dim": int(cfg["qk_nope_head_dim"]),
        "kv_lora_rank": int(cfg["kv_lora_rank"]),
        "qk_rope_head_dim": int(cfg["qk_rope_head_dim"]),
        "v_head_dim": int(cfg["v_head_dim"]),
        "q_lora_rank": int(cfg["q_lora_rank"]) if cfg.get("q_lora_rank") else None,
    }


def _read_config(path: Path) -> dict:
    where = path / "config.json"
    cfg = _read_json(where)
    if not isinstance(cfg, dict):
        raise ConfigError(f"--model-path: {where} is not a JSON object")
    return cfg


def model_config(path: str | Path, dtype: str = "auto") -> ModelConfig:
    """Our :class:`ModelConfig` from ``config.json`` or a GGUF file's metadata (KV dtype: the checkpoint's unless
    ``dtype`` says)."""
    path = Path(path).expanduser()
    if gguf.is_gguf(path):
        return config_from_dict(gguf.read_config(path), path, dtype, name=path.stem)
    return config_from_dict(_read_config(path), path / "config.json", dtype, name=path.name)


def config_from_dict(cfg: dict, where: Path, dtype: str = "auto", *, name: str) -> ModelConfig:
    """A llama config (transformers 4 or 5 keys) as our :class:`ModelConfig`; anything that changes the math and
    is not understood is refused, naming the key."""
    archs = cfg.get("architectures") or []
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        kind = next((k for k, a in ARCHITECTURES.items() if a in archs), None)
    if kind is None:
        raise ConfigError(
            f"--model-path: {where} holds a {cfg.get('model_type') or archs or 'unknown'} model; "
            f"the supported architectures are {', '.join(ARCHITECTURES.values())}"
        )
    for key, allowed in REQUIRED_VALUES.items():
        if key in cfg and cfg[key] not in allowed:
            raise ConfigError(
                f"--model-path: {where}: {key}={cfg[key]!r} is not supported (only {', '.join(map(repr, allowed))})"
            )
    if dtype == "auto":
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    if dtype not in DTYPES:
        raise ConfigError(f"--model-path: dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        theta, scaling = _rope(cfg, where)
        fields = {"head_dim": int(cfg.get("head_dim") or hidden // heads), **_mla(kind, cfg, where, scaling)}
        partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        if partial is not None and float(partial) != 1.0:
            fields["partial_rotary_factor"] = float(partial)
        if kind == "bamba":
            fields.update(mamba.bamba_fields(cfg, where))
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate_size=int(cfg["intermediate_size"]),
            rope_theta=theta,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            kv_dtype=DTYPES[dtype],
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope_scaling=scaling,
            checkpoint=name,
            **_windows(kind, cfg, where),
            **fields,
        )
    except KeyError as e:
        raise ConfigError(f"--model-path: {where} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--model-path: {where} has a bad value: {e}") from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError("--model-path needs the safetensors package: pip install 'hicache-core[serve]'") from None
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConfigError(
            f"--model-path: {path} has no model.safetensors (nor an index of shards); "
            "save the model with safe_serialization=True"
        )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(path / f)))
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise ConfigError(f"--model-path: cannot read weights {path / f}: {e}") from None
    return out


def load_model(
    model_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: str = "auto",
    compute_dtype: torch.dtype = COMPUTE,
) -> TinyLlama:
    """The reference model with a checkpoint's weights: a Hugging Face directory or a llama GGUF file. ``dtype`` is
    the KV dtype; ``compute_dtype`` the weights' and activations'."""
    path = Path(model_path).expanduser()
    if gguf.is_gguf(path):
        cfg, t = gguf.read(path)
        c = config_from_dict(cfg, path, dtype, name=path.stem)
    else:
        if not path.is_dir():
            raise ConfigError(
                f"--model-path {model_path}: not a directory (give a local Hugging Face model "
                "directory or a .gguf file)"
            )
        cfg = _read_config(path)
        c, t = config_from_dict(cfg, path / "config.json", dtype, name=path.name), _tensors(path)
    # after the reads: a bad file fails first
    c = attrs.evolve(c, content_digest=checkpoint_fingerprint(path), compute_dtype=compute_dtype)
    return _assemble(c, t, cfg, device)


def config_from_args(args: Any) -> ModelConfig:
    """The model config a command's flags name (bench multiturn/trace/toolgap, serve): a ``--model-path``
    checkpoint's, or the random model's (its shape flags, ``--seed``, and ``--model-kind`` / ``--sliding-window``
    where the command has them), with ``--compute-dtype`` and ``--kv-cache-dtype`` applied."""
    compute = COMPUTE_DTYPES[getattr(args, "compute_dtype", "float64")]
    if args.model_path:
        c = attrs.evolve(model_config(args.model_path, args.dtype), compute_dtype=compute)
    else:
        shape = shape_from_args(args)
        base = ModelConfig(**shape)
        kind, window = getattr(args, "model_kind", "llama"), getattr(args, "sliding_window", 128)
        fields = attention_fields(kind, base.num_layers, window, base.head_dim)
        c = ModelConfig(**shape, **fields, seed=args.seed, compute_dtype=compute)
    return with_kv_cache_dtype(c, getattr(args, "kv_cache_dtype", "auto"))


def model_from_args(args: Any) -> TinyLlama:
    """The model of :func:`config_from_args`, its weights the checkpoint's or random (seeded)."""
    if not args.model_path:
        return TinyLlama(config_from_args(args))
    compute = COMPUTE_DTYPES[getattr(args, "compute_dtype", "float64")]
    model = load_model(args.model_path, dtype=args.dtype, compute_dtype=compute)
    model.config = with_kv_cache_dtype(model.config, getattr(args, "kv_cache_dtype", "auto"))
    return model


def _assemble(c: ModelConfig, t: dict[str, torch.Tensor], cfg: dict, device: torch.device | str) -> TinyLlama:
    """The model from Hugging Face-named tensors, every shape checked against the config."""

    def take(name: str, shape: tuple[int, ...], transpose: bool = False, optional: bool = False) -> Any:
        w = t.get(name)
        if w is None:
            if optional:
                return None
            raise ConfigError(
                f"--model-path: the weights lack {name!r} (is this a {', '.join(ARCHITECTURES.values())} checkpoint?)"
            )
        if tuple(w.shape) != shape:
            raise ConfigError(f"--model-path: {name} has shape {tuple(w.shape)}; config.json implies {shape}")
        w = w.to(c.compute_dtype)
        return (w.t() if transpose else w).contiguous().to(device)

    h, q, kv, inter = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    attention = (
        _mla_tensors(c)
        if c.is_mla
        else (
            ("wq", "self_attn.q_proj", q, h),
            ("wk", "self_attn.k_proj", kv, h),
            ("wv", "self_attn.v_proj", kv, h),
            ("wo", "self_attn.o_proj", h, q),
        )
    )
    mlp, mlp_norm, final_norm = _NAMES.get(cfg.get("model_type", ""), _LLAMA_NAMES)
    layers = []
    for i in range(c.num_layers):
        pre = f"model.layers.{i}."
        p = {
            "attn_norm": take(pre + "input_layernorm.weight", (h,)),
            "mlp_norm": take(f"{pre}{mlp_norm}.weight", (h,)),
        }
        if c.is_linear(i):  # a Mamba-2 mixer where the attention would be
            p.update(mamba.checkpoint_tensors(c, take, pre))
        for ours, theirs, out_dim, in_dim in (
            *(() if c.is_linear(i) else attention),
            ("w_gate", f"{mlp}.gate_proj", inter, h),
            ("w_up", f"{mlp}.up_proj", inter, h),
            ("w_down", f"{mlp}.down_proj", h, inter),
        ):
            if not in_dim:  # a norm's weight
                p[ours] = take(f"{pre}{theirs}.weight", (out_dim,))
                continue
            p[ours] = take(f"{pre}{theirs}.weight", (out_dim, in_dim), transpose=True)
            bias = take(f"{pre}{theirs}.bias", (out_dim,), optional=True)
            if bias is not None:
                p[ours + "_b"] = bias
        layers.append(p)
    embed = take("model.embed_tokens.weight", (c.vocab_size, h))
    tied = cfg.get("tie_word_embeddings", False)  # the head is the embedding
    lm_head = embed.t().contiguous() if tied else take("lm_head.weight", (c.vocab_size, h), transpose=True)
    weights = {"embed": embed, "layers": layers, "final_norm": take(f"{final_norm}.weight", (h,)), "lm_head": lm_head}
    return TinyLlama(c, device, weights=weights)


def _mla_tensors(c: ModelConfig) -> tuple[tuple[str, str, int, int], ...]:
    """DeepSeek-V2's attention tensors by our names: (ours, theirs, out, in); in 0 for a norm's (out,) weight."""
    h, heads, nope, rope = c.hidden_size, c.num_heads, c.head_dim, c.rope_dim
    rank, v = c.kv_lora_rank or 0, c.v_head_dim or 0
    q_out = heads * (nope + rope)
    if c.q_lora_rank:
        query: tuple[tuple[str, str, int, int], ...] = (
            ("wq_a", "self_attn.q_a_proj", c.q_lora_rank, h),
            ("q_norm", "self_attn.q_a_layernorm", c.q_lora_rank, 0),
            ("wq_b", "self_attn.q_b_proj", q_out, c.q_lora_rank),
        )
    else:
        query = (("wq", "self_attn.q_proj", q_out, h),)
    return (
        *query,
        ("w_kv_a", "self_attn.kv_a_proj_with_mqa", rank + rope, h),
        ("kv_norm", "self_attn.kv_a_layernorm", rank, 0),
        ("w_kv_b", "self_attn.kv_b_proj", heads * (nope + v), rank),
        ("wo", "self_attn.o_proj", h, heads * v),
    )
