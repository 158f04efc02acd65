"""Pages stored by KV head group (``"head_group"`` in the extra config, storage/head_split.py): servers at different
TP sizes share one store. A TP=1 writer's pages give each TP=2 rank exactly its heads, TP=2 writers' pages give a
TP=1 reader whole pages, for every layout, through the file and memory backends; the reference engine at TP=1 and
TP=2 reads what the other wrote and gives the recompute's tokens. A missing group is a miss, never a part page."""

import json
import os

import pytest
import torch
from test_engine import SMALL, parse

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.memory import HostPool, KVSpec
from hicache_core.registry.opening import open_storage
from hicache_core.testing import fill_random, random_keys

PS = 8
LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def _spec(heads):
    return KVSpec(layer_num=2, head_num=heads, head_dim=8, dtype=torch.bfloat16)


def _config(backend, tmp_path, layout, **extra):
    where = {"storage_dir": str(tmp_path)} if backend == "file" else {"store": f"heads-{tmp_path.name}"}
    return HiCacheConfig(
        page_size=PS,
        model_name="heads",
        hicache_mem_layout=layout,
        hicache_storage_backend=backend,
        hicache_storage_backend_extra_config={**where, "head_group": 1, **extra},
    )


def _rank(cfg, heads, rank=0, size=1):
    pool = HostPool(_spec(heads), 16 * PS, PS, cfg.hicache_mem_layout, pin_memory=False)
    return pool, open_storage(cfg, cfg.hicache_storage_backend, _spec(heads), pool, tp_rank=rank, tp_size=size)


def _bits(t):
    return t.contiguous().view(torch.int16)  # random bytes hold NaNs: compare bits, not values


@pytest.mark.parametrize("backend", ["file", "memory"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_tp1_page_gives_each_tp2_rank_its_heads_and_back(tmp_path, backend, layout):
    cfg = _config(backend, tmp_path, layout)
    keys = random_keys(4, PS)
    one, b1 = _rank(cfg, 4)
    src = one.alloc(4 * PS)
    fill_random(one, src)
    assert b1.batch_set_v1(keys, src) == [True] * 4
    starts = src[::PS].tolist()
    ranks = [_rank(cfg, 2, r, 2) for r in range(2)]
    for r, (pool, backend_r) in enumerate(ranks):
        dst = pool.alloc(4 * PS)
        assert backend_r.batch_exists(keys) == 4 and backend_r.batch_get_v1(keys, dst) == [True] * 4
        for a, b in zip(starts, dst[::PS].tolist()):
            assert torch.equal(_bits(one.page_view(a)[..., 2 * r : 2 * r + 2, :]), _bits(pool.page_view(b)))
    # the reverse: the two ranks write their halves of new pages, one rank reads them whole
    more = random_keys(3, PS)
    written = []
    for pool, backend_r in ranks:
        idx = pool.alloc(3 * PS)
        fill_random(pool, idx)
        assert backend_r.batch_set_v1(more, idx) == [True] * 3
        written.append((pool, idx[::PS].tolist()))
    whole = one.alloc(3 * PS)
    assert b1.batch_get_v1(more, whole) == [True] * 3
    for i, start in enumerate(whole[::PS].tolist()):
        for r, (pool, starts_r) in enumerate(written):
            assert torch.equal(
                _bits(one.page_view(start)[..., 2 * r : 2 * r + 2, :]), _bits(pool.page_view(starts_r[i]))
            )
    for _, b in [(one, b1), *ranks]:
        b.close()


def test_a_missing_group_is_a_miss_for_the_rank_that_needs_it(tmp_path):
    cfg = _config("file", tmp_path, "page_first_direct")
    keys = random_keys(2, PS)
    one, b1 = _rank(cfg, 4)
    src = one.alloc(2 * PS)
    fill_random(one, src)
    assert b1.batch_set_v1(keys, src) == [True, True]
    # the second page's head 3 goes missing: rank 1 (heads 2, 3) has one page, rank 0 (heads 0, 1) has both
    os.remove(b1.raw._path(keys[1] + ".h3"))  # the file backend's own path of that object
    (p0, r0), (p1, r1) = _rank(cfg, 2, 0, 2), _rank(cfg, 2, 1, 2)
    assert r0.batch_exists(keys) == 2 and r0.batch_get_v1(keys, p0.alloc(2 * PS)) == [True, True]
    assert r1.batch_exists(keys) == 1 and r1.batch_get_v1(keys, p1.alloc(2 * PS)) == [True, False]
    assert b1.batch_get_v1(keys, one.alloc(2 * PS)) == [True, False]  # the whole page is not there either
    for b in (b1, r0, r1):
        b.close()


def test_what_cannot_be_split_is_refused_with_the_fix(tmp_path):
    with pytest.raises(
        ConfigError, match=r'"head_group": 3 must divide the KV heads each rank holds \(4 at --tp-size 1\)'
    ):
        _rank(_config("file", tmp_path, "page_first", head_group=3), 4)
    with pytest.raises(ConfigError, match=r"\(2 at --tp-size 2\)"):
        _rank(_config("file", tmp_path, "page_first", head_group=4), 2, 0, 2)
    with pytest.raises(ConfigError, match='"head_group" and "codec" do not go together'):
        _rank(_config("file", tmp_path, "page_first", codec="zstd"), 4)
    with pytest.raises(ConfigError, match="head_group=-1"):
        HiCacheConfig(hicache_storage_backend_extra_config={"head_group": -1})
    extra = {"backend_name": "whole", "module_path": "test_codec", "class_name": "WholePagesOnly", "interface_v1": 1}
    cfg = HiCacheConfig(
        page_size=PS, hicache_storage_backend="dynamic", hicache_storage_backend_extra_config={**extra, "head_group": 1}
    )
    with pytest.raises(ConfigError, match='"head_group": storage backend .* stores whole pages only'):
        _rank(cfg, 4)


def test_the_engine_at_tp1_and_tp2_reads_what_the_other_wrote(tmp_path):
    """The multi-turn job's first round, served at one TP size from the pages the other wrote: storage hits, and
    the recompute's tokens. Without head groups the other size's pages are another namespace: no hit."""
    from hicache_core.bench.multiturn import Progress, Workload, base_config, run_config
    from hicache_core.engine.checkpoint import model_from_args

    def run(tp, store, rounds, config="hicache+storage", split=True):
        extra = {"prefetch_threshold": 16, **({"head_group": 1} if split else {})}
        args = parse(SMALL + ["--tp-size", str(tp), "--hicache-storage-backend-extra-config", json.dumps(extra)])
        base = base_config(args, str(store))
        return run_config(config, args, Workload(args), model_from_args(args), base, rounds, Progress(0, False))

    reference = run(1, tmp_path / "none", 1, "none")["outputs"]
    for writer, reader in ((1, 2), (2, 1)):
        store = tmp_path / f"tp{writer}-writes"
        run(writer, store, 2)
        got = run(reader, store, 1)
        assert got["outputs"] == reference, (writer, reader)
        assert got["hit_tokens"]["storage"] > 0, (writer, reader, got["hit_tokens"])
        if reader == 2:
            assert got["per_rank_hit_tokens"][0] == got["per_rank_hit_tokens"][1]
    plain = run(2, tmp_path / "tp1-writes", 1, split=False)  # per-rank pages: the TP=1 pages are not its own
    assert plain["hit_tokens"]["storage"] == 0 and plain["outputs"] == reference
