"""SGLang's bridge reads our engine's pages: our engine (a random llama of SGLang's test geometry: 3 layers, 2 KV heads
of 8, bf16 KV, 4-token pages) serves a prompt on a file store; ``HiCacheForSGLang`` on SGLang's REAL
``MHATokenToKVPoolHost`` (its own constructor, layer_first), given the engine's model name and fingerprint, finds
every whole page of the prompt under SGLang's own keys (its hash chain of the token ids) and reads into its pool
bytes equal to the pages our engine stored. The controls: a page_first pool (token-major pages: other bytes) and a
bridge without the fingerprint (another namespace) find nothing, so no pool ever reads another order's bytes.

Inside a server nothing needs setting by hand: for a local checkpoint SGLang names by its path, the bridge's
namespace is the one our engine gives that checkpoint (its directory name, its content digest). The server args
are set on a stand-in object, as in test_sglang_identity.py: a real ``ServerArgs`` needs a launched server."""

from __future__ import annotations

import random

import pytest
import torch
from real_pools import HEAD_DIM, HEADS, LAYERS, real_host_pool
from sglang_helpers import PS, read_pages, storage_config

from hicache_core.config import HiCacheConfig
from hicache_core.engine.checkpoint import load_model
from hicache_core.engine.engine import Engine
from hicache_core.engine.model import TinyLlama
from hicache_core.engine.model_config import ModelConfig
from hicache_core.engine.request import Request
from hicache_core.keys import hash_chain
from hicache_core.sglang import HiCacheForSGLang
from hicache_core.storage import HEADER_BYTES
from hicache_core.testing.checkpoint import make_checkpoint

PAGES = 5
PROMPT = [random.Random(3).randrange(3, 500) for _ in range(PAGES * PS + 2)]


def serve(model, store) -> dict[str, bytes]:
    """Our engine serves PROMPT on a file store; {key: stored page bytes}."""
    cfg = HiCacheConfig(
        page_size=PS,
        hicache_storage_backend="file",
        hicache_storage_backend_extra_config={"storage_dir": str(store)},
    )
    engine = Engine(model, cfg, "hicache+storage", device_tokens=PS * 32, max_running=1)
    try:
        engine.generate([Request("w", list(PROMPT), 3)])
        engine.flush()
    finally:
        engine.close()
    return {f.stem: f.read_bytes()[HEADER_BYTES:] for f in store.rglob("*.page")}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(store, model name, fingerprint, {key: stored page bytes}) after our engine served PROMPT on a file store."""
    store = tmp_path_factory.mktemp("engine-store")
    config = ModelConfig(
        vocab_size=512, hidden_size=32, num_layers=LAYERS, num_heads=4, num_kv_heads=HEADS, head_dim=HEAD_DIM,
        intermediate_size=64, kv_dtype=torch.bfloat16,
    )  # fmt: skip
    return store, config.name, config.fingerprint, serve(TinyLlama(config), store)


def bridge(store, name: str, fingerprint, layout: str):
    extra = {"hicache_backend": "file", "storage_dir": str(store)}
    if fingerprint is not None:
        extra["hicache_model_fingerprint"] = fingerprint
    backend = HiCacheForSGLang(storage_config(extra, model=name, layout=layout), {})
    pool = real_host_pool(layout, page_size=PS)
    backend.register_mem_pool_host(pool)
    return backend, pool


def reads_every_page(backend, pool, files) -> None:
    keys = hash_chain(PROMPT, PS)
    assert len(keys) == PAGES and set(keys) <= set(files), "our engine stored every whole page of the prompt"
    try:
        assert backend.batch_exists(keys) == PAGES
        host = torch.arange(PAGES * PS, dtype=torch.int64)
        assert all(backend.batch_get_v1(keys, host))
        for key, page in zip(keys, read_pages(pool, host)):
            assert page.contiguous().view(torch.uint8).numpy().tobytes() == files[key], key
    finally:
        backend.close()


def test_sglangs_bridge_reads_the_pages_our_engine_stored(written):
    store, name, fingerprint, files = written
    reads_every_page(*bridge(store, name, fingerprint, "layer_first"), files)


def test_inside_a_server_the_defaults_agree_with_our_engines(tmp_path, monkeypatch):
    import types

    import sglang.srt.runtime_context as rc

    ckpt = make_checkpoint(
        tmp_path / "tiny-llama", dtype="bfloat16", hidden=4 * HEAD_DIM, heads=2 * HEADS, layers=LAYERS
    )
    files = serve(load_model(ckpt, dtype="bfloat16"), tmp_path / "store")
    args = types.SimpleNamespace(
        model_path=str(ckpt), revision=None, dtype="bfloat16", quantization=None, kv_cache_dtype="auto"
    )
    monkeypatch.setattr(rc, "get_server_args", lambda: args)
    # SGLang's model name is the path it was given; no fingerprint in the extra config
    reads_every_page(*bridge(tmp_path / "store", str(ckpt), None, "layer_first"), files)


@pytest.mark.parametrize("layout,fingerprint", [("page_first", True), ("layer_first", False)])
def test_a_pool_of_another_order_or_identity_finds_nothing(written, layout, fingerprint):
    store, name, fp, _ = written
    backend, _ = bridge(store, name, fp if fingerprint else None, layout)
    try:
        assert backend.batch_exists(hash_chain(PROMPT, PS)) == 0
    finally:
        backend.close()
