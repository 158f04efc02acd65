"""cache_salt: requests with different salts share no cached prefix in any tier -- device radix, host, storage --
requests with the same salt do, and requests without one keep SGLang's keys. The KV of a salted request encodes
its salt (cache_helpers), so a page served across salts would also fail as wrong KV."""

import uuid

import pytest
from cache_helpers import PS, make_cache, run_request, seq

from hicache_core.keys import hash_chain, namespace_seed

TOKENS = seq(1, 6)


def test_the_device_tier_is_shared_within_a_salt_only():
    c = make_cache(device_pages=32, host_pages=0)
    assert run_request(c, TOKENS, "a1", salt="a")["computed"] == len(TOKENS)
    assert run_request(c, TOKENS, "b1", salt="b")["device"] == 0
    assert run_request(c, TOKENS, "n1")["device"] == 0  # no salt: the unsalted tree
    assert run_request(c, TOKENS, "a2", salt="a")["device"] == len(TOKENS)
    assert run_request(c, TOKENS, "n2")["device"] == len(TOKENS)


def test_the_host_tier_is_shared_within_a_salt_only():
    c = make_cache(device_pages=32, host_pages=32)
    run_request(c, TOKENS, "a1", salt="a")
    c.flush()
    c.evict(10**6)  # device copies go, host copies stay
    assert run_request(c, TOKENS, "b1", salt="b")["host"] == 0
    assert run_request(c, TOKENS, "a2", salt="a")["host"] == len(TOKENS)


def test_storage_is_shared_within_a_salt_only_across_instances():
    store = uuid.uuid4().hex
    w = make_cache(storage="memory", store=store)
    run_request(w, TOKENS, "w", salt="a")
    w.flush()
    w.close()
    for salt, want in (("b", 0), (None, 0), ("a", len(TOKENS))):
        r = make_cache(storage="memory", store=store, prefetch="wait_complete")
        assert run_request(r, TOKENS, "r", salt=salt)["storage"] == want, salt
        r.close()


def test_storage_keys_no_salt_is_sglangs_chain_and_a_salt_seeds_it():
    c = make_cache(storage="memory", store=uuid.uuid4().hex)
    run_request(c, TOKENS, "n")
    run_request(c, TOKENS, "s", salt="tenant")
    plain = c.match_prefix(TOKENS).last_node
    salted = c.match_prefix(TOKENS, namespace_seed(None, "tenant")).last_node
    assert plain.hash_value == hash_chain(TOKENS, PS)  # SGLang's keys, unchanged
    assert salted.hash_value == hash_chain(TOKENS, PS, namespace_seed(None, "tenant"))
    assert not set(plain.hash_value) & set(salted.hash_value)
    c.close()


def test_salt_roots_go_when_their_prefixes_do_and_hits_are_counted_per_salt():
    c = make_cache(device_pages=32, host_pages=0)
    run_request(c, TOKENS, "a1", salt="secret-a")
    run_request(c, TOKENS, "a2", salt="secret-a")
    per = c.metrics.stats()["per_salt"]
    label = namespace_seed(None, "secret-a")[:12]
    assert list(per) == [label] and per[label]["requests"] == 2 and per[label]["hit_tokens"]["device"] == len(TOKENS)
    assert "secret-a" not in str(c.metrics.stats())  # metrics name a digest, never the salt
    c.evict(10**6)
    assert not c.root.children


@pytest.mark.parametrize("bad", ["", 7])
def test_a_bad_salt_is_refused(bad):
    c = make_cache(device_pages=8, host_pages=0)
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        c.admit("r", TOKENS, salt=bad)


def test_a_namespace_past_its_host_quota_loses_its_own_pages_first():
    c = make_cache(device_pages=40, host_pages=40, salt_host_pages=6)
    run_request(c, seq(9, 3), "b", salt="b")  # tenant b: 3 host pages
    for i in range(4):  # tenant a: four 3-page prefixes, each pushed to host, under a 6-page cap
        run_request(c, seq(i, 3), f"a{i}", salt="a")
        c.flush()
        c.evict(10**6)
        assert c.quota.used(c.namespace_root(namespace_seed(None, "a"))) <= 6 * PS
    assert run_request(c, seq(9, 3), "b2", salt="b")["host"] == 3 * PS  # nothing of b's went for a
    assert run_request(c, seq(3, 3), "a9", salt="a")["host"] == 3 * PS  # a's newest is there
    assert run_request(c, seq(0, 3), "a8", salt="a")["host"] == 0  # a's oldest went first
    for i in range(6):  # the shared namespace has no cap
        run_request(c, seq(20 + i, 2), f"n{i}")
    c.flush()
    c.evict(10**6)
    assert (
        sum(len(n.host_value) for n in c.nodes() if n.host_value is not None and c.quota.namespace_of(n) is None)
        >= 12 * PS
    )


def test_a_namespace_at_its_quota_fetches_from_storage_only_what_fits():
    store = uuid.uuid4().hex
    w = make_cache(storage="memory", store=store)
    run_request(w, seq(1, 6), "w", salt="a")
    w.flush()
    w.close()
    r = make_cache(storage="memory", store=store, prefetch="wait_complete", salt_host_pages=4)
    got = run_request(r, seq(1, 6), "r", salt="a")
    assert got["storage"] == 4 * PS  # six pages stored, four fetched: the rest recomputed
    r.close()


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from cache_helpers import make_cache, run_request, seq
c = make_cache(device_pages=16, host_pages=16, storage="file", extra={{"storage_dir": {store!r}}},
               salt_storage_pages={cap})
for i in {prompts!r}:
    run_request(c, seq(i, 1), "r%d" % i, salt={salt!r})
    c.flush()
c.close()
"""


def _write_in_process(store, prompts, salt, cap=0):
    import subprocess
    import sys
    from pathlib import Path

    code = WRITER.format(tests=str(Path(__file__).parent), store=str(store), cap=cap, prompts=list(prompts), salt=salt)
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def _stored(store, prompts, salt) -> int:
    """How many of these one-page prompts' pages the file store holds (under the test model's namespace)."""
    from hicache_core.memory import HostPool
    from hicache_core.registry import make_storage_config
    from hicache_plugin_file.store import FileStorage

    c = make_cache(storage="file", extra={"storage_dir": str(store)})
    sc = make_storage_config(c.config, c.host_pool.spec)
    fs = FileStorage(sc, {"storage_dir": str(store)})
    fs.register_mem_pool_host(HostPool(c.host_pool.spec, 4 * PS, PS, pin_memory=False))
    keys = [hash_chain(seq(i, 1), PS, namespace_seed(None, salt))[0] for i in prompts]
    c.close()
    return sum(fs.exists(k) for k in keys)


def test_a_storage_quota_holds_across_processes_and_takes_only_the_namespaces_own_pages(tmp_path):
    store = tmp_path / "store"
    b = _write_in_process(store, range(100, 104), "tenant-b")  # 4 pages of tenant b, no cap
    err = b.communicate(timeout=120)[1]
    assert b.returncode == 0, err
    writers = [_write_in_process(store, range(k * 10, k * 10 + 6), "tenant-a", cap=5) for k in (1, 2)]
    for w in writers:  # two processes write 12 pages of tenant a at once, under a 5-page cap
        err = w.communicate(timeout=120)[1]
        assert w.returncode == 0, err
    assert _stored(store, [*range(10, 16), *range(20, 26)], "tenant-a") == 5
    assert _stored(store, range(100, 104), "tenant-b") == 4  # nothing of b's went for a


def test_a_storage_quota_on_a_backend_that_cannot_hold_one_is_refused():
    from hicache_core.errors import ConfigError

    with pytest.raises(ConfigError, match="--hicache-salt-storage-pages: storage backend 'memory' cannot hold"):
        make_cache(storage="memory", store=uuid.uuid4().hex, salt_storage_pages=4)
