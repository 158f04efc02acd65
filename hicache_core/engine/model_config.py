"""The reference model's configuration: shape, attention kinds per layer, KV and compute dtypes, and its identity
(name, fingerprint) in the storage namespace."""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from hicache_core.errors import ConfigError
from hicache_core.memory import KVSpec
from hicache_core.memory.spec import FP8_SCALED, MAMBA_STATE, SCALE_BYTES
from hicache_core.parse import KV_CACHE_DTYPES

COMPUTE = torch.float64  # the default compute dtype (bit-stable across batch shapes)
COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# attention kinds per layer, by transformers' names (config.json's layer_types; Bamba's layers_block_type calls its
# Mamba-2 layers linear_attention)
FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"
LAYER_TYPES = (FULL, SLIDING, LINEAR)
# fields that are left out of a random model's fingerprint while they hold their default (None), so the pages of
# every model made before they existed keep their namespace
# the MLA fields (DeepSeek-V2's names), all given or none
MLA_FIELDS = ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
# the Mamba-2 mixer's shape (Bamba's mamba_n_heads, mamba_d_head, mamba_n_groups, mamba_d_state, mamba_d_conv), all
# given or none: engine/mamba.py
MAMBA_FIELDS = ("mamba_heads", "mamba_head_dim", "mamba_groups", "mamba_state", "mamba_conv")
_NEW_FIELDS = (
    "sliding_window",
    "layer_types",
    *MLA_FIELDS,
    "q_lora_rank",
    "partial_rotary_factor",
    *MAMBA_FIELDS,
)


@attrs.frozen(kw_only=True)
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 384
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1024
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    seed: int = 0
    kv_dtype: torch.dtype = torch.bfloat16
    compute_dtype: torch.dtype = COMPUTE  # weights and activations (float64, or float32: see the module doc)
    max_position_embeddings: int = 1 << 20
    # llama3 / linear rope scaling from a checkpoint's config.json (None: plain rotary)
    rope_scaling: Optional[dict] = attrs.field(default=None, eq=False, hash=False)
    checkpoint: Optional[str] = None  # the model directory it was loaded from (its name is then the model's)
    # the checkpoint's content digest (hicache_core/identity.py); None for the random model
    content_digest: Optional[str] = attrs.field(default=None, eq=False, hash=False)
    # sliding-window attention (Mistral; Qwen2's and Gemma's windowed layers): a query at position p attends to the
    # keys at p - sliding_window + 1 .. p (transformers' mask); ``layer_types`` says which layers are windowed
    # (None: all of them, when sliding_window is set)
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple[str, ...]] = attrs.field(
        default=None, converter=lambda v: tuple(v) if v is not None else None
    )

    # multi-head latent attention (DeepSeek-V2): a token keeps one vector per layer, its ``kv_lora_rank`` latent
    # (normed) and its ``qk_rope_head_dim`` rotary key shared by the heads; each head's key (``head_dim``, the
    # "nope" part, plus the rotary one) and value (``v_head_dim``) are expanded from it. ``q_lora_rank``: queries
    # through a low-rank projection too (None: one matrix)
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    q_lora_rank: Optional[int] = None
    # rotary embeddings on the first ``partial_rotary_factor`` of each head's dimensions only (Bamba: 0.5)
    partial_rotary_factor: Optional[float] = None
    # Mamba-2 mixers on the layers ``layer_types`` calls linear_attention (engine/mamba.py): ``mamba_heads`` heads of
    # ``mamba_head_dim`` channels, B and C in ``mamba_groups`` groups of ``mamba_state``, a ``mamba_conv``-wide
    # causal convolution
    mamba_heads: Optional[int] = None
    mamba_head_dim: Optional[int] = None
    mamba_groups: Optional[int] = None
    mamba_state: Optional[int] = None
    mamba_conv: Optional[int] = None

    def __attrs_post_init__(self) -> None:
        mla = [getattr(self, f) for f in MLA_FIELDS]
        if any(v is not None for v in mla) or self.q_lora_rank is not None:
            if any(v is None for v in mla):
                raise ConfigError(f"an MLA model gives all of {', '.join(MLA_FIELDS)}, got {mla}")
            for f in (*MLA_FIELDS, "q_lora_rank"):
                v = getattr(self, f)
                if v is not None and (not isinstance(v, int) or v <= 0):
                    raise ConfigError(f"{f} must be a whole number > 0, got {v!r}")
            if self.qk_rope_head_dim % 2:  # type: ignore[operator]
                raise ConfigError(f"qk_rope_head_dim must be even (rotated in pairs), got {self.qk_rope_head_dim}")
            if self.sliding_window is not None:
                raise ConfigError("an MLA model with sliding-window layers is not supported: give one or the other")
        self._check_rotary_and_mamba()
        w, types = self.sliding_window, self.layer_types
        if w is not None and (not isinstance(w, int) or w <= 0):
            raise ConfigError(f"sliding_window must be a whole number of tokens > 0, got {w!r}")
        if types is None:
            return
        if len(types) != self.num_layers or set(types) - set(LAYER_TYPES):
            raise ConfigError(
                f"layer_types must name each of the {self.num_layers} layers {' or '.join(LAYER_TYPES)}, got {types!r}"
            )
        if SLIDING in types and w is None:
            raise ConfigError("layer_types has sliding_attention layers but no sliding_window is given")

    def _check_rotary_and_mamba(self) -> None:
        f = self.partial_rotary_factor
        if f is not None:
            if self.is_mla or not 0 < f <= 1 or int(self.head_dim * f) % 2:
                raise ConfigError(
                    f"partial_rotary_factor={f!r}: give a fraction of head_dim ({self.head_dim}) in (0, 1] that "
                    "rotates an even number of dimensions (and none for MLA, whose rotary part is qk_rope_head_dim)"
                )
        shape = [getattr(self, n) for n in MAMBA_FIELDS]
        if all(v is None for v in shape):
            if self.layer_types is None or LINEAR not in self.layer_types:
                return
            raise ConfigError(f"layer_types has {LINEAR} (Mamba) layers: give all of {', '.join(MAMBA_FIELDS)}")
        bad = [n for n, v in zip(MAMBA_FIELDS, shape) if not isinstance(v, int) or v <= 0]
        if bad:
            raise ConfigError(f"a Mamba model gives all of {', '.join(MAMBA_FIELDS)} as whole numbers > 0, got {shape}")
        if self.mamba_heads % self.mamba_groups:  # type: ignore[operator]
            raise ConfigError(f"mamba_groups ({self.mamba_groups}) must divide mamba_heads ({self.mamba_heads})")
        if self.is_mla or self.sliding_window is not None or self.kv_dtype == torch.float8_e4m3fn:
            raise ConfigError(
                "a Mamba model's attention layers are plain full attention with float KV here: not MLA, not "
                "sliding-window, not fp8 (its recurrent state is kept in float32 bytes inside the KV pages)"
            )
        if self.layer_types is None or LINEAR not in self.layer_types:
            raise ConfigError(f"the mamba_* shape is given but layer_types names no {LINEAR} layer")

    @property
    def has_mamba(self) -> bool:
        return self.mamba_heads is not None

    def is_linear(self, layer: int) -> bool:
        """Whether layer ``layer`` is a Mamba-2 mixer (no KV of its own: its state rides in its pages)."""
        return self.layer_types is not None and self.layer_types[layer] == LINEAR

    def window(self, layer: int) -> Optional[int]:
        """How many trailing keys layer ``layer`` attends to (None: all of them)."""
        if self.sliding_window is None or (self.layer_types is not None and self.layer_types[layer] != SLIDING):
            return None
        return self.sliding_window

    @property
    def attention_kind(self) -> str:
        """``full`` (every layer sees every key), ``swa`` (every layer windowed), ``hybrid`` (some of each) or
        ``mamba`` (Mamba-2 mixers beside full-attention layers)."""
        if self.has_mamba:
            return "mamba"
        windowed = sum(self.window(i) is not None for i in range(self.num_layers))
        return "full" if not windowed else "swa" if windowed == self.num_layers else "hybrid"

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def rope_dim(self) -> int:
        """Dimensions a head's query and key rotate: all of ``head_dim``, or MLA's rotary part."""
        if self.qk_rope_head_dim is not None:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor) if self.partial_rotary_factor else self.head_dim

    def kv_spec(self) -> KVSpec:
        """The KV pools' geometry: K and V per KV head, or MLA's one latent vector per token (SGLang's MLA layout:
        ``kv_lora_rank + qk_rope_head_dim``). fp8 KV keeps each head's (each latent's) float32 scale after its
        values (memory/kv_codec.py)."""
        heads, dim = self.num_kv_heads, self.head_dim
        if self.is_mla:
            heads, dim = 1, self.kv_lora_rank + self.rope_dim  # type: ignore[operator]
        fp8 = self.kv_dtype == torch.float8_e4m3fn
        return KVSpec(
            layer_num=self.num_layers,
            head_num=heads,
            head_dim=dim + SCALE_BYTES if fp8 else dim,
            dtype=self.kv_dtype,
            is_mla=self.is_mla,
            kv_format=FP8_SCALED if fp8 else MAMBA_STATE if self.has_mamba else "",
        )

    @property
    def fingerprint(self) -> str:
        """The weights' identity for the storage namespace: the checkpoint's content digest, or the random
        model's seed and shape."""
        from hicache_core.identity import random_fingerprint

        base = self.content_digest or random_fingerprint(
            {
                f.name: getattr(self, f.name)
                for f in attrs.fields(ModelConfig)
                if f.name not in ("kv_dtype", "content_digest", "checkpoint", "compute_dtype")
                and not (f.name in _NEW_FIELDS and getattr(self, f.name) is None)
            }
        )
        if self.compute_dtype == COMPUTE:
            return base
        return f"{base}+act-{str(self.compute_dtype).replace('torch.', '')}"  # its KV differs in the last bits

    @property
    def name(self) -> str:
        if self.checkpoint:
            return self.checkpoint
        if self.is_mla:
            q = f"-qr{self.q_lora_rank}" if self.q_lora_rank else ""
            return (
                f"tiny-mla-h{self.hidden_size}-l{self.num_layers}-q{self.num_heads}{q}-r{self.kv_lora_rank}"
                f"-d{self.head_dim}-rope{self.qk_rope_head_dim}-v{self.v_head_dim}-seed{self.seed}"
            )
        windows = ""
        if self.has_mamba:
            linear = ".".join(str(i) for i in range(self.num_layers) if self.is_linear(i))
            windows = (
                f"-mamba{linear}-mh{self.mamba_heads}-md{self.mamba_head_dim}-mg{self.mamba_groups}"
                f"-ms{self.mamba_state}-mc{self.mamba_conv}"
            )
        elif self.attention_kind == "swa":
            windows = f"-swa{self.sliding_window}"
        elif self.attention_kind == "hybrid":
            full = ".".join(str(i) for i in range(self.num_layers) if self.window(i) is None)
            windows = f"-swa{self.sliding_window}-full{full}"
        return (
            f"tiny-llama-h{self.hidden_size}-l{self.num_layers}-q{self.num_heads}-kv{self.num_kv_heads}"
            f"-d{self.head_dim}-seed{self.seed}{windows}"
        )


# the random model's shape as command-line flags: (flag, ModelConfig field, what); `hicache bench multiturn` and
# `hicache serve` both take them, so a served random model can be the benchmark's own
SHAPE_FLAGS = (
    ("--hidden-size", "hidden_size", "model width"),
    ("--intermediate-size", "intermediate_size", "MLP width"),
    ("--num-layers", "num_layers", "layers"),
    ("--num-heads", "num_heads", "attention heads"),
    ("--num-kv-heads", "num_kv_heads", "KV heads"),
    ("--head-dim", "head_dim", "head dimension"),
    ("--vocab-size", "vocab_size", "vocabulary"),
)


def shape_from_args(args: Any) -> dict[str, Any]:
    """The SHAPE_FLAGS given in ``args`` (None: not given), as ModelConfig fields."""
    return {f: getattr(args, f) for _, f, _ in SHAPE_FLAGS if getattr(args, f, None) is not None}


# the random model's attention kinds (``hicache bench multiturn --model-kind``): llama (every layer full), swa
# (every layer windowed, as Mistral), hybrid (odd layers windowed, even layers full, as gpt-oss alternates) and mla
# (DeepSeek-V2's latent attention: a 128-wide latent and a 32-wide rotary key per token, 160 values where the
# llama's 2 KV heads keep 256) and mamba (even layers Mamba-2 mixers, odd layers full, as Bamba interleaves them:
# 8 heads of 16 channels and an 8-wide state: 1,456 float32 values of state per layer, which fit the default
# model's 16-token page)
MODEL_KINDS = ("llama", "swa", "hybrid", "mla", "mamba")
MLA_SHAPE = {"kv_lora_rank": 128, "qk_rope_head_dim": 32}
MAMBA_SHAPE = {"mamba_heads": 8, "mamba_head_dim": 16, "mamba_groups": 1, "mamba_state": 8, "mamba_conv": 4}


def attention_fields(kind: str, num_layers: int, window: int, head_dim: int = 64) -> dict[str, Any]:
    """The ModelConfig fields of a random model of attention ``kind`` with ``window``-token windows (``head_dim``:
    the model's, for MLA's value heads)."""
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model kind {kind!r}: choose one of {', '.join(MODEL_KINDS)}")
    if kind == "llama":
        return {}
    if kind == "swa":
        return {"sliding_window": window}
    if kind == "mla":  # every head's nope key and value as wide as the llama's heads (head_dim)
        return {**MLA_SHAPE, "v_head_dim": head_dim}
    if kind == "mamba":
        return {**MAMBA_SHAPE, "layer_types": tuple(FULL if i % 2 else LINEAR for i in range(num_layers))}
    return {"sliding_window": window, "layer_types": tuple(SLIDING if i % 2 else FULL for i in range(num_layers))}


def with_kv_cache_dtype(config: ModelConfig, name: str) -> ModelConfig:
    if name not in KV_CACHE_DTYPES:
        raise ConfigError(f"--kv-cache-dtype {name!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    return config if name == "auto" else attrs.evolve(config, kv_dtype=torch.float8_e4m3fn)
