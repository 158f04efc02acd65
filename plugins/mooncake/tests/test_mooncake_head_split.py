"""Head-split pages (``"head_group"``, hicache_core/storage/head_split.py) on a real mooncake_master: the reference
engine at TP=1 and at TP=2 reads the pages the other size wrote, with the recompute's tokens. The pages live in a
segment holder's memory (the engines contribute none), so they outlive the engine that wrote them."""

import argparse
import json
import subprocess
import sys

import pytest
from test_mooncake_replicas import HOLDER

from hicache_core.bench import multiturn

SMALL = (
    "--num-clients 4 --num-rounds 2 --request-length 96 --question-length 32 --output-length 6 --request-rate 200 "
    "--device-tokens 256 --max-running 2 --hidden-size 64 --intermediate-size 128 --num-layers 2 --num-heads 4 "
    "--num-kv-heads 2 --head-dim 16 --vocab-size 512 --page-size 16 --hicache-ratio 1.5 --no-progress"
).split()


@pytest.fixture
def holder(master):
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, master.metadata, master.address], stdout=subprocess.PIPE, text=True
    )
    if p.stdout.readline().strip() != "0":  # type: ignore[union-attr]
        p.kill()
        pytest.fail("the segment holder could not join the store")
    yield p
    p.kill()
    p.wait(timeout=10)


def _run(master, tp, rounds, tag, config="hicache+storage"):
    extra = master.extra(global_segment_size="0", extra_backend_tag=tag, head_group=1, prefetch_threshold=16)
    p = argparse.ArgumentParser()
    multiturn.add_arguments(p)
    args = p.parse_args(
        [*SMALL, "--tp-size", str(tp), "--hicache-storage-backend", "mooncake"]
        + ["--hicache-storage-backend-extra-config", json.dumps(extra)]
    )
    base = multiturn.base_config(args, "")
    from hicache_core.engine.checkpoint import model_from_args

    model = model_from_args(args)
    work = multiturn.Workload(args)
    return multiturn.run_config(config, args, work, model, base, rounds, multiturn.Progress(0, False))


def test_tp1_and_tp2_engines_read_each_others_pages(master, holder):
    reference = _run(master, 1, 1, "ref", "none")["outputs"]
    for writer, reader in ((1, 2), (2, 1)):
        tag = f"w{writer}"  # each direction on keys of its own
        _run(master, writer, 2, tag)
        got = _run(master, reader, 1, tag)
        assert got["outputs"] == reference, (writer, reader)
        assert got["hit_tokens"]["storage"] > 0, (writer, reader, got["hit_tokens"])
