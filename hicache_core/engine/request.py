"""A request's life in the engine (prompt, output, where its TTFT went) and a prefill/decode instance's cache
config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import attrs
import torch

from hicache_core.cache import Admission
from hicache_core.cache.retention import RetentionHint
from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError

DISAGGREGATION_MODES = ("null", "prefill", "decode")
# TTFT's phases: queued (arrived, not admitted: no room, the running batch full, other requests first),
# prefetch_wait (admission waited for its storage prefetch), load (host -> device: starting the loads, and the
# forward pass blocked on a layer still landing), compute (the prefill forward, less those waits; its batch's)
PHASES = ("queued", "prefetch_wait", "load", "compute")


@attrs.define(eq=False)
class Request:
    rid: str
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = attrs.field(factory=list)
    arrival: float = 0.0
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    cached: dict = attrs.field(factory=lambda: {"device": 0, "host": 0, "storage": 0})
    admission: Optional[Admission] = None  # slots: the cached prefix, then its own for computed tokens
    used: int = 0  # own slots holding KV
    eos: frozenset = frozenset()  # token ids that end the request (unless ignore_eos)
    # called on the scheduler's thread after each new token; returning True ends the request (a stop string)
    on_token: Optional[Callable[[Request], Optional[bool]]] = None
    finish_reason: Optional[str] = None  # "length", "stop" (eos or a stop condition), "abort"
    params: Any = None  # what the server built it from (tensor-parallel followers rebuild it from these)
    salt: Optional[str] = None  # cache_salt and extra_key: prefixes are shared only among requests with the same
    extra_key: Optional[str] = None
    # where its TTFT went (seconds; they sum to ttft): see PHASES. prefetch: how its storage prefetch ended
    phases: dict = attrs.field(factory=lambda: dict.fromkeys(PHASES, 0.0))
    prefetch: Optional[str] = None
    wait_since: Optional[float] = None  # first answered 'wait' (its storage prefetch in flight), until admitted
    # keep this request's prefix through churn (cache/retention.py), and how the cache answered that hint
    retention: Optional[RetentionHint] = None
    retention_answer: Optional[dict] = None

    @property
    def ttft(self) -> float:
        return (self.first_token_time or 0.0) - self.arrival

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached.values())

    def slots(self) -> torch.Tensor:
        assert self.admission is not None
        return self.admission.slots(self.used)

    def _emit(self, tok: int) -> None:
        self.output.append(tok)
        if tok in self.eos:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.on_token is not None and self.on_token(self) and self.finish_reason is None:
            self.finish_reason = "stop"


def role_config(config: HiCacheConfig, mode: str, role: str, offload: bool) -> HiCacheConfig:
    """The cache config of a prefill or decode instance (ConfigError for flags that do not fit): a decode instance
    prefetches from the first page and waits for all of it (it must not recompute what prefill handed over)."""
    if role not in DISAGGREGATION_MODES:
        raise ConfigError(f"--disaggregation-mode {role!r}: choose one of {', '.join(DISAGGREGATION_MODES)}")
    if offload and role != "decode":
        raise ConfigError(
            "--disaggregation-decode-enable-offload-kvcache is for a decode instance: add --disaggregation-mode decode"
        )
    if role == "null":
        return config
    if mode != "hicache+storage":
        raise ConfigError(
            f"--disaggregation-mode {role} hands KV between prefill and decode through the storage "
            "tier they share: add --enable-hierarchical-cache and --hicache-storage-backend (the same "
            "backend and extra config on both)"
        )
    writes = role == "prefill" or offload
    if writes and config.hicache_write_policy != "write_through":
        what = "prefill" if role == "prefill" else "decode with offload"
        raise ConfigError(
            f"a {what} instance writes every request's pages to storage as it finishes: it needs "
            f"--hicache-write-policy write_through, not {config.hicache_write_policy}"
        )
    if role == "decode":
        extra = {**config.hicache_storage_backend_extra_config, "prefetch_threshold": config.page_size}
        config = config.replace(
            hicache_storage_prefetch_policy="wait_complete", hicache_storage_backend_extra_config=extra
        )
    return config
