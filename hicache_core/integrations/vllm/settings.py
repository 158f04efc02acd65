"""What both halves of the vLLM connector agree on without talking: hicache's settings (from the transfer config's
``kv_connector_extra_config``), the KV geometry vLLM allocated, the page format and namespace, and the host pool's
size. The scheduler process and every worker compute these from the same vLLM config, so they match by
construction; nothing here imports vLLM, so it is tested without it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.identity import checkpoint_fingerprint
from hicache_core.memory import KVSpec
from hicache_core.registry import make_storage_config
from hicache_core.storage.base import StorageConfig

logger = logging.getLogger(__name__)

# keys of kv_connector_extra_config that are the connector's own, not HiCacheConfig fields
STAGING_PAGES = "hicache_staging_pages"
PAGE_ORDER = "hicache_page_order"
CONNECTOR_KEYS = (STAGING_PAGES, PAGE_ORDER)
PAGE_ORDERS = ("hicache", "vllm")


def hicache_config(extra: Optional[Mapping[str, Any]], block_size: int, model_name: str) -> HiCacheConfig:
    """HiCacheConfig from the extra config (flag names with underscores; a JSON string for the backend's own
    extra config is accepted). ``page_size`` must be vLLM's block size: a page is one vLLM block."""
    values = {k: v for k, v in dict(extra or {}).items() if k not in CONNECTOR_KEYS}
    raw = values.get("hicache_storage_backend_extra_config")
    if isinstance(raw, str) and raw.strip():
        try:
            values["hicache_storage_backend_extra_config"] = json.loads(raw)
        except ValueError as e:
            raise ConfigError(
                f"kv_connector_extra_config: hicache_storage_backend_extra_config is not valid JSON ({e}): {raw!r}"
            ) from e
    page_size = values.pop("page_size", block_size)
    try:
        page_size = int(page_size)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"kv_connector_extra_config: page_size must be an integer, not {page_size!r}") from e
    if page_size != block_size:
        raise ConfigError(
            f"kv_connector_extra_config: page_size {page_size} differs from vLLM's block size {block_size}; a hicache "
            f"page is one vLLM block: drop page_size or start vLLM with --block-size {page_size}"
        )
    values.setdefault("model_name", model_name)
    try:
        config = HiCacheConfig.from_mapping(values)
    except TypeError as e:
        raise ConfigError(f"kv_connector_extra_config: {e}") from e
    return config.replace(page_size=page_size, enable_hierarchical_cache=True)


def staging_pages(extra: Optional[Mapping[str, Any]], host_pages: int) -> int:
    """Pages the worker keeps for storage I/O of its own (reads land there, writes leave from there): the host
    tier's pages are the scheduler's to reuse, and a storage call past its deadline must not hold one of them."""
    raw = dict(extra or {}).get(STAGING_PAGES)
    if raw is None:
        return max(16, min(256, host_pages // 4))
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(f"kv_connector_extra_config: {STAGING_PAGES} must be a positive integer, not {raw!r}")
    return raw


def page_order(extra: Optional[Mapping[str, Any]], device: str, cache_dtype: str) -> str:
    """How pages are stored: ``hicache`` (hicache's page order, converted at the storage boundary: the pages our
    engine and SGLang's layer-major pools store, so engines share a prompt) or ``vllm`` (vLLM's block bytes as they
    are: no conversion, read only by vLLM on the same platform and ISA). The default is ``hicache`` where the
    connector can convert (vLLM's CPU attention, a 16- or 32-bit KV cache), else ``vllm``."""
    convertible = device == "cpu" and cache_dtype in ("auto", "bfloat16", "float16")
    raw = dict(extra or {}).get(PAGE_ORDER)
    if raw is None:
        return "hicache" if convertible else "vllm"
    if raw not in PAGE_ORDERS:
        choices = ", ".join(PAGE_ORDERS)
        raise ConfigError(f"kv_connector_extra_config: {PAGE_ORDER} must be one of {choices}, not {raw!r}")
    if raw == "hicache" and not convertible:
        raise ConfigError(
            f'kv_connector_extra_config: {PAGE_ORDER} "hicache" converts the blocks of vLLM\'s CPU attention with a '
            f'16- or 32-bit KV cache; this is device {device!r} with kv cache dtype {cache_dtype!r}: use "vllm"'
        )
    return str(raw)


def default_model_name(model: str, served: Any) -> str:
    """The namespace's model name: vLLM's served name when one was given, else, for a local checkpoint, its
    directory (or file) name, as our engine names it, so both engines' pages of one checkpoint share keys."""
    name = served[0] if isinstance(served, (list, tuple)) and served else served
    if name and str(name) != str(model):
        return str(name)
    path = Path(model).expanduser()
    return path.name if path.exists() else str(model)


@attrs.frozen
class Geometry:
    """vLLM's paged KV as hicache sees it: one page = one block of every attention layer."""

    layer_names: tuple[str, ...]
    num_blocks: int
    block_size: int
    kv_heads: int
    head_size: int
    dtype: torch.dtype
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def spec(self) -> KVSpec:
        return KVSpec(
            layer_num=len(self.layer_names), head_num=self.kv_heads, head_dim=self.head_size, dtype=self.dtype
        )

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        return 2 * self.kv_heads * self.block_size * self.head_size * self.dtype.itemsize

    @property
    def page_bytes(self) -> int:
        return self.block_bytes * len(self.layer_names)


def host_pages(config: HiCacheConfig, geometry: Geometry) -> int:
    """The host tier in pages: ``hicache_size`` GB if set, else ``hicache_ratio`` x vLLM's blocks."""
    if config.hicache_size > 0:
        pages = int(config.hicache_size * 1e9 // geometry.page_bytes)
        source = f"hicache_size {config.hicache_size} GB"
    else:
        pages = int(geometry.num_blocks * config.hicache_ratio)
        source = f"hicache_ratio {config.hicache_ratio} x {geometry.num_blocks} vLLM blocks"
    if pages < 1:
        raise ConfigError(f"the host tier from {source} holds no page of {geometry.page_bytes} bytes; raise it")
    return pages


def model_fingerprint(config: HiCacheConfig, model: str) -> str:
    """The checkpoint's content digest (a model updated in place gets a new namespace). A model that is not a local
    path (a hub name) needs ``hicache_model_fingerprint``: a name is not an identity."""
    if config.hicache_model_fingerprint:
        return config.hicache_model_fingerprint
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(
            f"HiCacheConnector: model {model!r} is not a local path, so hicache cannot fingerprint its weights; pass "
            "a local checkpoint directory (or GGUF file), or set hicache_model_fingerprint in kv_connector_extra_config"
        )
    return checkpoint_fingerprint(path)


def storage_config(config: HiCacheConfig, geometry: Geometry, page_format: str, fingerprint: str) -> StorageConfig:
    """The StorageConfig whose namespace carries vLLM's page format: vLLM pages never mix with hicache's own."""
    sc = make_storage_config(
        config.replace(hicache_model_fingerprint=fingerprint),
        geometry.spec,
        layout="page_first_direct",
        tp_rank=geometry.tp_rank,
        tp_size=geometry.tp_size,
    )
    return attrs.evolve(sc, namespace=attrs.evolve(sc.namespace, page_format=page_format))
