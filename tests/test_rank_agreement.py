"""Tensor-parallel ranks keep identical trees: each rank is a real process with its own cache, pools and file
backend, agreeing through torch.distributed (gloo). One rank's backend failing or stalling for some pages must
not make the trees -- or the KV served -- differ; MLA pages are written once."""

from __future__ import annotations

import pytest
from rank_helpers import run_ranks


@pytest.mark.parametrize("fault", ["none", "raise", "hang"])
def test_two_ranks_keep_identical_trees(tmp_path, fault):
    r0, r1 = run_ranks(tmp_path, fault=fault)
    for r in (r0, r1):
        assert r["same_tree"], (r0, r1)
        assert r["wrong_kv"] == 0 and r["leaked"] == 0, r
        assert r["requests"] > 0
    assert r0["collectives"] == r1["collectives"] > 0  # the same decisions, in the same order
    assert r0["storage_tokens"] == r1["storage_tokens"]  # both were served the same prefixes from storage
    if fault == "none":
        assert r0["storage_tokens"] > 0
    else:
        assert r1["errors"], r1  # rank 1 saw its backend's faults (rank 0 may see a slow call on a busy machine)
        assert not {k for k in r0["errors"] if k.endswith("_exception")}, r0["errors"]  # none injected there


def test_mla_pages_are_written_once_and_read_by_every_rank(tmp_path):
    r0, r1 = run_ranks(tmp_path, mla=True)
    assert r0["same_tree"] and r0["wrong_kv"] == r1["wrong_kv"] == 0
    assert r0["set_pages"] > 0 and r1["set_pages"] == 0  # rank 0 writes; rank 1 reads what it wrote
    assert r1["get_pages"] > 0 and r1["storage_tokens"] > 0


def test_agreement_refuses_a_second_thread(tmp_path):
    import threading

    import torch.distributed as dist

    from hicache_core.cache.agree import RankAgreement

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        agree = RankAgreement()
        assert agree.min([3, 1]) == [3, 1]
        errors = []
        t = threading.Thread(target=lambda: errors.append(_raises(lambda: agree.min([1]))))
        t.start()
        t.join()
        assert errors == ["second thread"]
    finally:
        dist.destroy_process_group()


def _raises(fn) -> str:
    try:
        fn()
    except RuntimeError as e:
        return "second thread" if "second thread" in str(e) else str(e)
    return "no error"
