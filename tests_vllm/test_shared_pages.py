"""One page format across engines: a REAL vLLM (HiCacheConnector, the default ``hicache`` page order) and our
engine, on the same checkpoint, dtype and page size, store the same pages under the same keys.

- vLLM writes a prompt's pages to a file store; our engine, started on that store, takes them as storage hits and
  answers with the tokens it gives when it computes everything itself.
- Our engine writes the prompt's pages to another store; vLLM, started on it, reports them cached (vLLM's own
  prefix cache is off: every cached token came through the connector) and answers with vLLM-alone's tokens.
- Both stores hold the same files (same namespace, same keys), and each page's values agree to float32 rounding:
  vLLM's KV unpacked from its CPU kernels' order is our engine's KV for the same tokens.
- With ``"head_group": 1`` (one object per KV head, the TP-agnostic pages) vLLM's head objects serve our engine.
- The control: with ``"hicache_page_order": "vllm"`` (vLLM's packed bytes, its own namespace) our engine finds
  nothing of vLLM's."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from hicache_core.config import HiCacheConfig
from hicache_core.engine.checkpoint import load_model
from hicache_core.engine.engine import Engine
from hicache_core.engine.request import Request
from hicache_core.storage import HEADER_BYTES

from conftest import run_many

PS = 32
PROMPT = [random.Random(7).randrange(3, 300) for _ in range(3 * PS + 5)]


def connector(store: Path, backend_extra: dict | None = None, **more) -> dict:
    extra = {"storage_dir": str(store), "prefetch_threshold": 0, **(backend_extra or {})}
    backend = {"hicache_storage_backend": "file", "hicache_storage_backend_extra_config": extra}
    return {"hicache_size": 0.05, **backend, **more}


def engine_run(model, store: Path | None, rid: str, **extra) -> Request:
    """One request through our engine (float32 KV, float64 compute): with ``store``, on a file store (``extra``: more
    of the backend's extra config)."""
    if store is None:
        cfg, mode = HiCacheConfig(page_size=PS), "none"
    else:
        cfg, mode = (
            HiCacheConfig(
                page_size=PS,
                hicache_ratio=2,
                hicache_storage_backend="file",
                hicache_storage_backend_extra_config={"storage_dir": str(store), "prefetch_threshold": 0, **extra},
                hicache_storage_prefetch_policy="wait_complete",
            ),
            "hicache+storage",
        )
    engine = Engine(model, cfg, mode, device_tokens=PS * 16, max_running=1)
    try:
        r = engine.generate([Request(rid, list(PROMPT), 8)])[0]
        engine.flush()
        return r
    finally:
        engine.close()


def pages(store: Path) -> dict[str, torch.Tensor]:
    """Each stored page's values (float32), by its path under the store (the namespace's directory, the key)."""
    return {
        str(f.relative_to(store)): torch.frombuffer(bytearray(f.read_bytes()[HEADER_BYTES:]), dtype=torch.float32)
        for f in store.rglob("*.page")
    }


def test_vllm_and_our_engine_read_each_others_pages(tmp_path, tiny):
    model = load_model(tiny, dtype="float32")
    recompute = engine_run(model, None, "recompute")
    ours = tmp_path / "ours"
    written = engine_run(model, ours, "writer")
    assert written.output == recompute.output and written.cached["storage"] == 0

    runs = run_many(
        tmp_path,
        tiny,
        [[PROMPT]],
        {
            "vllm_writes": (connector(tmp_path / "theirs"), {}),
            "vllm_reads": (connector(ours), {}),
            "vllm_alone": (None, {}),
            "vllm_packed": (connector(tmp_path / "packed", hicache_page_order="vllm"), {}),
            "vllm_by_head": (connector(tmp_path / "by-head", {"head_group": 1}), {}),
        },
        block_size=PS,
    )
    alone = runs["vllm_alone"][0][0]
    reads = runs["vllm_reads"][0][0]
    assert reads["cached"] == 3 * PS, reads  # every whole page of the prompt, from our engine's store
    assert reads["tokens"] == alone["tokens"]

    read_back = engine_run(model, tmp_path / "theirs", "reader")
    assert read_back.cached["storage"] == 3 * PS, read_back.cached
    assert read_back.output == recompute.output

    mine, theirs = pages(ours), pages(tmp_path / "theirs")
    common = sorted(set(mine) & set(theirs))
    assert len(common) >= 3, f"no shared keys: ours {sorted(mine)[:4]}, vLLM's {sorted(theirs)[:4]}"
    for name in common:
        assert torch.allclose(mine[name], theirs[name], rtol=1e-3, atol=1e-4), name

    # pages by KV head (TP-agnostic: docs/sglang.md's heterogeneous TP): our engine reads vLLM's head objects too
    by_head = engine_run(model, tmp_path / "by-head", "by-head", head_group=1)
    assert by_head.cached["storage"] == 3 * PS and by_head.output == recompute.output, by_head.cached

    vllm_bytes = {Path(n).name: t for n, t in pages(tmp_path / "packed").items()}  # before our engine adds its own
    assert len(vllm_bytes) >= 3, "the packed run stored pages"
    packed = engine_run(model, tmp_path / "packed", "control")
    assert packed.cached["storage"] == 0, "vLLM's packed pages must live in a namespace of their own"
    # the same tokens' KV in vLLM's kernel order is other bytes: the conversion is what made the pages shared
    assert not any(torch.allclose(vllm_bytes[Path(n).name], mine[n]) for n in common if Path(n).name in vllm_bytes)
