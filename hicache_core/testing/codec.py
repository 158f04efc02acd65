"""The conformance kit's L3 codec check: a backend with blob methods round-trips zstd pages byte-exact (and stores
fewer bytes than the pages'); one without them is refused the codec at start, with the reason."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch

from hicache_core.errors import ConfigError
from hicache_core.keys import hash_chain
from hicache_core.registry import open_backend, resolve_config


def kv_like(pool: Any, indices: torch.Tensor) -> None:
    """Values shaped like KV (normal, over a few magnitudes) into the host pages: what a codec sees in service."""
    for segs in pool.page_memoryviews(indices):
        for seg in segs:
            n = len(seg) // pool.spec.itemsize
            x = torch.randn(n) * torch.logspace(-2, 1, n)[torch.randperm(n)]
            seg[:] = x.to(pool.dtype).view(torch.uint8).numpy().tobytes()


def codec_round_trip(kit: Any, tmp_path: Any) -> None:
    if not kit.backend_name:
        pytest.skip("no backend_name: the backend is not registered under a name")
    extra = {**kit.extra_config(tmp_path), "codec": "zstd", "codec_when": "always"}
    cfg = kit.config(
        "page_first_direct",
        hicache_io_backend="direct",
        hicache_storage_backend=kit.backend_name,
        hicache_storage_backend_extra_config=extra,
    )
    cfg, resolved = resolve_config(cfg)
    if importlib.util.find_spec("zstandard") is None:  # the codec is refused with how to get it
        with pytest.raises(ConfigError, match="needs the zstandard package"):
            open_backend(cfg, kit.spec, 4 * kit.pages * kit.page_size, resolved=resolved)
        return
    if resolved is not None and resolved.interface_v1 and not hasattr(resolved.cls, "batch_get_blobs"):
        with pytest.raises(ConfigError, match="stores whole pages only"):
            open_backend(cfg, kit.spec, 4 * kit.pages * kit.page_size, resolved=resolved)
        return
    handle, pool = open_backend(cfg, kit.spec, 4 * kit.pages * kit.page_size, resolved=resolved)
    kit._opened.append(handle)
    ps, n = kit.page_size, kit.pages
    src, dst = pool.alloc(n * ps), pool.alloc(n * ps)
    assert src is not None and dst is not None
    kv_like(pool, src)
    keys = hash_chain(torch.randint(0, 2**31, (n * ps,)).tolist(), ps, prior_hash=os.urandom(32).hex())
    assert list(handle.batch_set_v1(keys, src)) == [True] * n
    assert handle.batch_exists(keys) == n
    assert list(handle.batch_get_v1(keys, dst)) == [True] * n
    views = pool.page_memoryviews
    assert [b"".join(map(bytes, p)) for p in views(dst)] == [b"".join(map(bytes, p)) for p in views(src)]
    codec = (handle.get_stats() or {})["codec"]
    assert codec["pages_encoded"] == n and codec["ratio"] > 1.05, codec
