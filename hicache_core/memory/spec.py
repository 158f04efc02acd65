"""What one token's KV looks like: the facts every pool, transfer and namespace derives from."""

from __future__ import annotations

import attrs
import torch

from hicache_core.errors import ConfigError

# KV dtypes by the names the CLI and benchmarks accept.
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


# fp8 e4m3 KV with one float32 scale per token and head, stored after that head's values (its last 4 bytes): a
# page then carries its scales wherever it goes (host, storage), in every layout, as plain bytes
FP8_SCALED = "e4m3+f32scale/token-head"
SCALE_BYTES = 4
# a model with Mamba-2 layers (engine/mamba.py): each such layer's part of a page holds no KV but the layer's
# recurrent and convolution state after the page's last token, as float32 bytes; moved as bytes like any page, and
# never to be quantized (the fp8 codec refuses a pool whose pages have a format)
MAMBA_STATE = "mamba2-f32state/page"
KV_FORMATS = ("", FP8_SCALED, MAMBA_STATE)


@attrs.frozen(kw_only=True)
class KVSpec:
    """KV geometry of one model shard. MLA keeps one latent vector per token and layer (``head_num=1``,
    ``head_dim=kv_lora_rank+qk_rope_head_dim``); MHA/GQA keeps K and V of ``head_num x head_dim``."""

    layer_num: int
    head_num: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    is_mla: bool = False
    # how a head's ``head_dim`` stored elements encode its values: "" (as they are) or FP8_SCALED (``head_dim -
    # SCALE_BYTES`` fp8 values, then their float32 scale)
    kv_format: str = ""

    def __attrs_post_init__(self) -> None:
        for name in ("layer_num", "head_num", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"KVSpec.{name} must be a whole number > 0, got {v!r}")
        if self.kv_format not in KV_FORMATS:
            raise ConfigError(f"KVSpec.kv_format {self.kv_format!r}: choose one of {KV_FORMATS}")
        if self.kv_format == FP8_SCALED and (self.dtype != torch.float8_e4m3fn or self.head_dim <= SCALE_BYTES):
            raise ConfigError(
                f"KVSpec.kv_format {FP8_SCALED!r} stores float8_e4m3fn values and their scale "
                f"(head_dim > {SCALE_BYTES}), not {self.dtype} x {self.head_dim}"
            )
        if self.is_mla and self.head_num != 1:
            raise ConfigError("an MLA KVSpec has head_num=1 (one latent vector per token and layer)")

    @property
    def value_dim(self) -> int:
        """Values per head a model reads and writes (``head_dim`` less the scale's bytes for FP8_SCALED)."""
        return self.head_dim - SCALE_BYTES if self.kv_format == FP8_SCALED else self.head_dim

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def num_kv(self) -> int:
        """1 for MLA (one latent buffer), 2 for MHA (K and V)."""
        return 1 if self.is_mla else 2

    @property
    def item_bytes(self) -> int:
        """Bytes of one token of one layer of K (or of the MLA latent)."""
        return self.head_num * self.head_dim * self.itemsize

    @property
    def size_per_token(self) -> int:
        """Bytes of one token across all layers, K and V together."""
        return self.item_bytes * self.layer_num * self.num_kv

    def page_bytes(self, page_size: int) -> int:
        return self.size_per_token * page_size

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def require_host_memory(nbytes: int, what: str) -> None:
    """Refuse, with the sizes, a host allocation larger than this machine's physical memory (instead of a
    failure deep inside the allocator)."""
    import os

    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > physical:
        raise ConfigError(
            f"{what} needs {nbytes / 2**30:.1f} GiB but this machine has {physical / 2**30:.1f} GiB of "
            "memory: not enough memory for these sizes; lower them (page size, pages or tokens, "
            "--hicache-ratio / --hicache-size, layers, heads)"
        )
