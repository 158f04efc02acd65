"""Proactive restore and soft retention at the cache's door, on the file backend (real files): a restore started
during a tool gap makes the next turn a host hit, a request joins a restore in flight, every restore ends in a
state that says why; retention keeps a session's prefix through churn that evicts others, hints past their budget
are clipped or rejected, and closing the session releases it."""

from __future__ import annotations

import threading
import time

import pytest
from cache_helpers import PS, SENTINEL, empty_and_check, make_cache, run_request

from hicache_core.cache.retention import MAX_PRIORITY, RetentionHint

PROMPT = list(range(100, 100 + 6 * PS))


def settle(cache, op_id, timeout=20.0):
    deadline = time.monotonic() + timeout
    while (r := cache.fleet.restore_status(op_id)).state == "running":
        assert time.monotonic() < deadline, "the restore never ended"
        time.sleep(0.005)
        cache.poll()
    return r


def stored(tmp_path):
    """A cache whose storage holds PROMPT's pages and whose device and host tiers are empty (a tool gap's churn)."""
    cache = make_cache(device_pages=12, host_pages=16, storage="file", extra={"storage_dir": str(tmp_path)})
    run_request(cache, PROMPT, rid="turn1")
    cache.flush()
    cache.operator.empty_local_tiers()
    assert cache.match_prefix(PROMPT + [SENTINEL]).matched_length == 0
    return cache


def test_a_restore_during_the_gap_makes_the_next_turn_a_host_hit(tmp_path):
    cache = stored(tmp_path)
    r, note = cache.fleet.restore("gap-1", PROMPT + [SENTINEL], ttl=30)
    assert note == "" and r.state == "running"
    r = settle(cache, "gap-1")
    assert r.state == "success" and r.restored_tokens == len(PROMPT), r.as_dict()
    got = run_request(cache, PROMPT, rid="turn2")
    assert got["host"] == len(PROMPT) and got["storage"] == 0, got  # loaded from host: storage was not waited on
    assert cache.fleet.restore("gap-1", PROMPT)[0] is r  # the same operation id answers the same restore
    cache.flush()
    assert cache.fleet.restore("gap-2", PROMPT + [SENTINEL])[0].state == "cached"
    empty_and_check(cache, cache.device_pool.size, cache.host_pool.size)


class Gated:
    """The file backend with reads held until the gate opens (and counted), or failing."""

    def __init__(self, inner, fail=False) -> None:
        self.inner, self.gate, self.fail, self.gets = inner, threading.Event(), fail, 0

    def batch_get_v1(self, keys, host_indices, extra_info=None):
        self.gets += 1
        assert self.gate.wait(30)
        if self.fail:
            return [False] * len(keys)
        return self.inner.batch_get_v1(keys, host_indices, extra_info)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_request_joins_the_restore_in_flight(tmp_path):
    cache = stored(tmp_path)  # best_effort: the request still waits for the restore it joined
    gated = cache.operator.wrap_storage(Gated)
    cache.fleet.restore("gap", PROMPT + [SENTINEL])
    prompt = PROMPT + [SENTINEL]
    for _ in range(20):
        cache.poll()
        assert cache.admit("turn2", prompt).status == "wait"
    assert list(cache.ongoing_prefetch) == [("restore", None, "gap")], "the request started a second fetch"
    gated.gate.set()
    while (adm := cache.admit("turn2", prompt)).status == "wait":
        cache.poll()
    # it waited on storage (through the restore): its pages count as storage hits, and were read once
    assert adm.prefetch == "restored" and adm.cached["storage"] == len(PROMPT) and gated.gets == 1
    assert cache.fleet.restore_status("gap").state == "success"
    cache.release(adm, prompt, 0)
    empty_and_check(cache, cache.device_pool.size, cache.host_pool.size)


def test_every_restore_ends_in_a_state_that_says_why(tmp_path):
    cache = stored(tmp_path)
    assert settle(cache, cache.fleet.restore("unknown", list(range(5000, 5000 + 4 * PS)))[0].op_id).state == "miss"
    gated = cache.operator.wrap_storage(Gated)
    cache.fleet.restore("cancel-me", PROMPT)
    cache.poll()
    assert cache.fleet.cancel_restore("cancel-me").state == "cancelled"
    cache.fleet.restore("late", PROMPT, ttl=0.2)
    r = settle(cache, "late")
    assert r.state == "expired" and "TTL" in r.detail
    gated.fail = True
    gated.gate.set()
    r = settle(cache, cache.fleet.restore("broken", PROMPT)[0].op_id)
    assert r.state == "failure" and "none could be read" in r.detail, r.as_dict()
    assert cache.fleet.restore("long", [1, 2, 3], ttl=10**6)[1] == "ttl clipped to 3600 s"
    cache.operator.wrap_storage(lambda w: w.inner)
    assert cache.metrics.stats()["restores"] == {"miss": 1, "cancelled": 1, "expired": 1, "failure": 1, "declined": 1}
    empty_and_check(cache, cache.device_pool.size, cache.host_pool.size)
    no_storage = make_cache(device_pages=8, host_pages=8)
    r, _ = no_storage.fleet.restore("x", PROMPT)
    assert r.state == "declined" and "no storage tier" in r.detail
    no_storage.close()


def churn(cache, n=8, base=10_000):
    for i in range(n):
        run_request(cache, [base * (i + 1) + j for j in range(5 * PS)], rid=f"churn{i}")
        cache.flush()


def held(cache, tokens) -> int:
    return cache.match_prefix(tokens).matched_length


def test_retention_keeps_a_session_through_churn_that_evicts_others():
    cache = make_cache(device_pages=8, host_pages=16)  # write_through: the churn fills the host tier too
    session, other = PROMPT + [SENTINEL], [7000 + j for j in range(6 * PS)] + [SENTINEL]
    run_request(cache, PROMPT, rid="a1")  # an engine asks as it releases the request (engine.Engine._finish)
    answer = cache.fleet.retain("a1", session, RetentionHint(120, priority=3, session_id="agent-a"))
    assert answer.status == "accepted" and answer.tokens == len(PROMPT), answer
    run_request(cache, other[:-1], rid="b1")
    cache.flush()
    churn(cache)  # device and host both turn over: every unretained prefix goes
    assert held(cache, other) == 0
    assert held(cache, session) == len(PROMPT)  # demoted to host, never dropped
    got = run_request(cache, PROMPT, rid="a2")
    assert got["host"] + got["device"] == len(PROMPT)
    # the session is over: its prefix is evicted like any other
    assert cache.fleet.release_retention("agent-a").status == "released"
    churn(cache, base=20_000)
    assert held(cache, session) == 0
    cache.close()


def test_hints_past_their_budget_are_clipped_not_obeyed():
    # retained prefixes may hold a quarter of the host tier (16 pages): 4 pages
    cache = make_cache(
        device_pages=8,
        host_pages=16,
        hicache_retention_ratio=0.25,
        hicache_retention_max_seconds=30,
    )
    run_request(cache, PROMPT, rid="a")
    a = cache.fleet.retain("a", PROMPT + [SENTINEL], RetentionHint(10**6, priority=10**6, session_id="a"))
    assert a.status == "clipped" and a.seconds == 30 and a.priority == MAX_PRIORITY
    assert a.tokens <= 4 * PS < len(PROMPT), a
    assert "clipped to 30" in a.reason and "budget" in a.reason
    other = [9000 + j for j in range(3 * PS)]
    run_request(cache, other, rid="b")
    b = cache.fleet.retain("b", other + [SENTINEL], RetentionHint(5, session_id="b"))
    assert b.status == "rejected" and "budget" in b.reason
    assert cache.fleet.retain("c", [1, 2], RetentionHint(5)).status == "rejected"  # nothing cached in whole pages
    assert cache.fleet.retain("d", other, RetentionHint(-1)).status == "rejected"
    assert cache.metrics.stats()["retention"] == {"clipped": 1, "rejected": 3}
    cache.flush()
    churn(cache)
    assert held(cache, PROMPT) == a.tokens  # the part granted survived; the rest went like any other page
    cache.close()


@pytest.mark.parametrize("ratio", [0.0])
def test_retention_can_be_off(ratio):
    cache = make_cache(device_pages=8, host_pages=8, hicache_retention_ratio=ratio)
    run_request(cache, PROMPT[: 2 * PS], rid="a")
    assert cache.fleet.retain("a", PROMPT[: 2 * PS], RetentionHint(5)).status == "rejected"
    cache.close()


def test_a_grant_lapses_after_its_seconds_unless_a_hit_refreshes_it():
    cache = make_cache(device_pages=8, host_pages=16)
    run_request(cache, PROMPT, rid="a")
    assert cache.fleet.retain("a", PROMPT + [SENTINEL], RetentionHint(0.4, session_id="s")).status == "accepted"
    time.sleep(0.25)
    run_request(cache, PROMPT, rid="a2")  # a hit on the prefix: another 0.4 s from now
    time.sleep(0.25)
    cache.poll()
    assert (None, "s") in cache.fleet.retention.grants
    time.sleep(0.3)
    cache.poll()
    assert not cache.fleet.retention.grants
    cache.close()


# --- tenants: a request's cache_salt / extra_key is its tenant ---------------------------------------------------
def test_two_tenants_with_one_session_id_never_meet():
    cache = make_cache(device_pages=12, host_pages=16)
    mine, theirs = PROMPT[: 2 * PS], [8000 + j for j in range(2 * PS)]
    run_request(cache, mine, rid="a", salt="tenant-a")
    run_request(cache, theirs, rid="b", salt="tenant-b")
    a = cache.fleet.retain("a", mine + [SENTINEL], RetentionHint(60, session_id="agent"), salt="tenant-a")
    b = cache.fleet.retain("b", theirs + [SENTINEL], RetentionHint(60, session_id="agent"), salt="tenant-b")
    assert a.status == b.status == "accepted"  # b's hint did not replace a's grant: the keys are (tenant, session)
    assert len(cache.fleet.retention.grants) == 2
    assert [s["key"] for s in cache.fleet.sessions(salt="tenant-a")] == ["agent"]
    assert cache.fleet.sessions() == []  # the unsalted tenant holds nothing
    # neither another tenant nor the unsalted one can release a's session
    assert cache.fleet.release_retention("agent", salt="tenant-b").status == "released"  # b's own
    assert cache.fleet.release_retention("agent", salt="tenant-b").status == "rejected"
    assert cache.fleet.release_retention("agent").status == "rejected"
    assert [s["key"] for s in cache.fleet.sessions(salt="tenant-a")] == ["agent"]
    assert cache.fleet.release_retention("agent", salt="tenant-a").status == "released"
    cache.close()


def test_one_tenants_retention_budget_leaves_room_for_the_others():
    # retention may hold half of the host tier (8 of 16 pages), one tenant a quarter (4 pages)
    cache = make_cache(device_pages=12, host_pages=16, hicache_retention_ratio=0.5, hicache_retention_tenant_ratio=0.25)
    greedy = PROMPT  # 6 pages
    run_request(cache, greedy, rid="g", salt="greedy")
    g = cache.fleet.retain("g", greedy + [SENTINEL], RetentionHint(60, session_id="s1"), salt="greedy")
    assert g.status == "clipped" and g.tokens == 4 * PS and "--hicache-retention-tenant-ratio" in g.reason, g
    more = [6000 + j for j in range(2 * PS)]
    run_request(cache, more, rid="g2", salt="greedy")
    g2 = cache.fleet.retain("g2", more + [SENTINEL], RetentionHint(60, session_id="s2"), salt="greedy")
    assert g2.status == "rejected" and "this tenant's retention budget" in g2.reason, g2
    other = [7000 + j for j in range(3 * PS)]
    run_request(cache, other, rid="o", salt="other")
    o = cache.fleet.retain("o", other + [SENTINEL], RetentionHint(60, session_id="s1"), salt="other")
    assert o.status == "accepted" and o.tokens == 3 * PS, o
    cache.close()


def test_restores_belong_to_their_tenant(tmp_path):
    cache = make_cache(device_pages=12, host_pages=16, storage="file", extra={"storage_dir": str(tmp_path)})
    run_request(cache, PROMPT, rid="turn1", salt="a")
    cache.flush()
    cache.operator.empty_local_tiers()
    ra, _ = cache.fleet.restore("op", PROMPT + [SENTINEL], salt="a")
    rb, _ = cache.fleet.restore("op", PROMPT + [SENTINEL], salt="b")  # the same id from another tenant: its own op
    assert ra is not rb
    assert cache.fleet.restore_status("op", salt="b") is rb and cache.fleet.restore_status("op") is None
    assert cache.fleet.cancel_restore("op") is None  # the unsalted tenant cannot cancel a's
    while (r := cache.fleet.restore_status("op", salt="a")).state == "running":
        cache.poll()
        time.sleep(0.005)
    assert r.state == "success" and r.restored_tokens == len(PROMPT), r.as_dict()
    while cache.fleet.restore_status("op", salt="b").state == "running":
        cache.poll()
        time.sleep(0.005)
    assert cache.fleet.restore_status("op", salt="b").state == "miss"  # b's namespace holds none of a's pages
    cache.close()
