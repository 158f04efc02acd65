"""Page-hash chain and the storage namespace.

The chain is SGLang's: ``H0 = sha256(tokens(P0))``, ``Hi = sha256(bytes(H(i-1)) || tokens(Pi))`` with every token
as a 4-byte little-endian unsigned int, hex digests; a request with a ``cache_salt`` seeds it with
:func:`namespace_seed` of its ``extra_key`` and ``cache_salt``, as SGLang does. A key therefore names a whole
prefix, so equal keys mean equal prefixes. Bytes only; never Python's ``hash()`` (it changes between processes).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from typing import Optional

import attrs

# Which layouts share a page byte order. A flat page is (K|V, layer, token, head, dim) for layer_first and
# page_first_direct, (K|V, token, layer, head, dim) for page_first; only the byte order enters the namespace,
# so a layer_first instance and a page_first_direct instance read each other's pages.
PAGE_BYTE_ORDER = {"layer_first": "layer-major", "page_first_direct": "layer-major", "page_first": "token-major"}


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as e:
        raise ValueError(f"token ids must be integers in [0, 2**32): {e}") from e


def page_hash(tokens: Sequence[int], prior_hash: Optional[str] = None) -> str:
    """SHA-256 hex of one page, chained on the previous page's hex digest (None for the first page)."""
    h = hashlib.sha256()
    if prior_hash:
        h.update(bytes.fromhex(prior_hash))
    h.update(_token_bytes(tokens))
    return h.hexdigest()


def namespace_seed(extra_key: Optional[str] = None, cache_salt: Optional[str] = None) -> Optional[str]:
    """The chain's seed for a request's namespace -- its ``extra_key`` (an adapter, a tenant) and ``cache_salt``
    -- exactly as SGLang 0.5.23 seeds its storage chains (``storage_namespace_seed``), so a salted page has the
    same key in hicache and in SGLang: SHA-256 of ``b"sglang-cache-namespace-v1"`` then, for each of the two,
    ``b"\\x00"`` when absent or ``b"\\x01"`` + its UTF-8 length (8 bytes, little endian) + its UTF-8 bytes.
    None when both are absent: SGLang's unseeded keys."""
    if extra_key is None and cache_salt is None:
        return None
    h = hashlib.sha256(b"sglang-cache-namespace-v1")
    for part in (extra_key, cache_salt):
        if part is None:
            h.update(b"\x00")
        else:
            raw = part.encode("utf-8")
            h.update(b"\x01" + len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def hash_chain(tokens: Sequence[int], page_size: int, prior_hash: Optional[str] = None) -> list[str]:
    """One chained hash per whole page of ``tokens``; a trailing partial page is ignored."""
    out = []
    for start in range(0, len(tokens) - len(tokens) % page_size, page_size):
        prior_hash = page_hash(tokens[start : start + page_size], prior_hash)
        out.append(prior_hash)
    return out


@attrs.frozen(kw_only=True)
class StorageNamespace:
    """Everything that changes a page's bytes. Configurations that differ here never read each other's pages."""

    model: str = ""
    fingerprint: str = ""  # the weights' identity (hicache_core/identity.py): a model updated in place gets a new one
    dtype: str = "bfloat16"
    page_size: int = 64
    layout: str = "layer_first"
    is_mla: bool = False
    layer_num: int = 1
    head_num: int = 1
    head_dim: int = 1
    tp_size: int = 1
    tp_rank: int = 0
    # whose byte order a page is in when it is not hicache's own pool's: "vllm/cpu/CPU_ATTN/amx" for vLLM's paged KV
    # (its attention kernels pack a block their own way); empty for hicache's pools, so their tags do not change
    page_format: str = ""
    # how a head's stored bytes encode its values (KVSpec.kv_format: fp8 with its scales); empty for plain KV, so
    # the tags of plain KV do not change
    kv_format: str = ""
    # the L3 page codec's format (storage/codec.py: "zstd-planes", "fp8-e4m3-b128"); empty without one
    codec: str = ""
    # pages kept as one object per this many KV heads (storage/head_split.py): ``head_num`` is then the model's
    # total and no rank is named, so every TP size shares them; 0 (per-rank pages) leaves the tags as they were
    head_group: int = 0

    def fields(self) -> dict:
        d = {
            "model": self.model,
            "dtype": self.dtype,
            "page_size": self.page_size,
            "page_order": PAGE_BYTE_ORDER.get(self.layout, self.layout),
            "kv": "mla" if self.is_mla else "mha",
            "layers": self.layer_num,
            "heads": self.head_num,
            "head_dim": self.head_dim,
        }
        if self.head_group:
            d["heads_per_object"] = self.head_group
        elif not self.is_mla:  # MLA's latent KV is the same on every rank: ranks share pages
            d["tp"] = f"{self.tp_rank}of{self.tp_size}"
        if self.fingerprint:
            d["fingerprint"] = self.fingerprint
        if self.page_format:
            d["page_format"] = self.page_format
        if self.kv_format:
            d["kv_format"] = self.kv_format
        if self.codec:
            d["codec"] = self.codec
        return d

    @property
    def tag(self) -> str:
        """A short stable digest of :meth:`fields`, used as a key prefix or a directory name."""
        text = ";".join(f"{k}={v}" for k, v in sorted(self.fields().items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def key(self, page_key: str) -> str:
        """The namespaced form of one page key."""
        return f"{self.tag}-{page_key}"

    def keys(self, page_keys: Iterable[str]) -> list[str]:
        tag = self.tag
        return [f"{tag}-{k}" for k in page_keys]
