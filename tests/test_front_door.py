"""The front door under pressure: many requests in flight through admit / release / abort at once, holding
device slots and pins while others arrive, wait on storage, get evicted around, cancel and finish.

After every step: each running request's pinned prefix still holds exactly the KV of its tokens, and every
device page is owned once (by the tree or by one running request). At the end: every page is free again."""

import uuid

import hypothesis.strategies as st
from cache_helpers import (
    PS,
    SENTINEL,
    empty_and_check,
    kv_matches,
    locks_balanced,
    make_cache,
    owned_pages_ok,
    write_kv,
)
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

from hicache_core.cache.retention import RetentionHint

PAGES = st.lists(st.integers(0, 4), min_size=1, max_size=4)
SALTS = st.sampled_from([None, None, "tenant-a", "tenant-b"])  # the KV of a salted prompt encodes its salt


def prompt_of(pages: list[int]) -> list[int]:
    return [p * 10 + j for p in pages for j in range(PS)] + [SENTINEL]


class FrontDoorMachine(RuleBasedStateMachine):
    waiting = Bundle("waiting")
    running = Bundle("running")

    @initialize(
        policy=st.sampled_from(["write_through", "write_through_selective", "write_back"]),
        prefetch=st.sampled_from(["best_effort", "wait_complete", "timeout", "cost_aware"]),
        layout=st.sampled_from(["layer_first", "page_first_direct"]),
        quota=st.sampled_from([0, 3]),
    )
    def setup(self, policy, prefetch, layout, quota):
        self.cache = make_cache(
            device_pages=14,
            host_pages=10,
            storage="memory",
            store=uuid.uuid4().hex,
            write_policy=policy,
            prefetch=prefetch,
            layout=layout,
            salt_host_pages=quota,
        )
        self.dev_total = self.cache.device_pool.available_size()
        self.host_total = self.cache.host_pool.available_size()
        self.n = 0
        self.live: dict = {}  # rid -> (prompt, admission) of running requests

    def _admit(self, rid, prompt, extra, salt):
        adm = self.cache.admit(rid, prompt, extra, salt=salt)
        event(f"admit: {adm.status}" + (" (salted)" if salt else ""))
        if adm.ready:
            self.cache.ready_to_load_host_cache()
            for layer in range(self.cache.device_pool.layer_num):
                self.cache.device_pool.wait_layer(layer)
            assert kv_matches(self.cache.device_pool, adm.prefix, prompt, salt), "admitted with wrong KV (or salt's)"
            assert len(adm.prefix) < len(prompt) and len(adm.own) >= len(prompt) - len(adm.prefix) + extra
            self.live[rid] = (prompt, adm)
        return adm

    @rule(target=waiting, pages=PAGES, extra=st.integers(0, 5), salt=SALTS)
    def arrive(self, pages, extra, salt):
        self.n += 1
        rid = f"r{self.n}"
        self._admit(rid, prompt_of(pages), extra, salt)
        return rid, prompt_of(pages), extra, salt  # admitted or not: retry() moves it along

    @rule(target=running, item=consumes(waiting))
    def retry(self, item):
        rid, prompt, extra, salt = item
        if rid in self.live:
            return rid
        self.cache.poll()
        adm = self._admit(rid, prompt, extra, salt)
        if not adm.ready:
            self.cache.abort(rid)  # an engine would ask again; this client gives up
            return None
        return rid

    @rule(target=running, item=consumes(waiting))
    def client_gone_while_waiting(self, item):
        rid = item[0]
        if rid not in self.live:
            self.cache.abort(rid)
            return None
        return rid

    @rule(rid=consumes(running), computed_part=st.floats(0, 1))
    def finish(self, rid, computed_part):
        """Compute some or all of the uncached tokens (a cancelled request computes fewer), then release."""
        if rid not in self.live:
            return
        prompt, adm = self.live.pop(rid)
        computed = int(round((len(prompt) - len(adm.prefix)) * computed_part))
        write_kv(self.cache.device_pool, adm.slots(computed), prompt, adm.salt)
        self.cache.release(adm, prompt, computed)

    @rule(
        pages=PAGES,
        secs=st.sampled_from([0.01, 5.0, 1e9]),
        prio=st.integers(-2, 200),
        session=st.sampled_from([None, "s1", "s2"]),
    )
    def retain(self, pages, secs, prio, session):
        """An agent asks to keep a prefix (cached or not): always answered, never a pin (teardown evicts it all)."""
        self.n += 1
        answer = self.cache.fleet.retain(f"k{self.n}", prompt_of(pages), RetentionHint(secs, prio, session))
        assert answer.status in ("accepted", "clipped", "rejected"), answer
        event(f"retain: {answer.status}")

    @rule(session=st.sampled_from(["s1", "s2"]))
    def close_session(self, session):
        assert self.cache.fleet.release_retention(session).status in ("released", "rejected")

    @rule(pages=PAGES, ttl=st.sampled_from([0.001, 30.0]), salt=SALTS)
    def restore(self, pages, ttl, salt):
        """A restore of a prompt (in flight beside requests, some of which join it); it may expire at once."""
        self.n += 1
        r, _ = self.cache.fleet.restore(f"op{self.n}", prompt_of(pages), ttl, salt=salt)
        event(f"restore: {r.state}")

    @rule()
    def poll(self):
        self.cache.poll()

    @rule(n=st.integers(1, 60))
    def evict_device(self, n):
        self.cache.evict(n)

    @rule(n=st.integers(1, 60))
    def evict_host(self, n):
        self.cache.evict_host(n)

    @precondition(lambda self: hasattr(self, "cache"))
    @invariant()
    def pinned_prefixes_hold_and_pages_owned_once(self):
        c = self.cache
        tree, request = [], []
        for n in c.nodes():
            if n.value is not None:
                tree += n.value[::PS].tolist()
        for prompt, adm in self.live.values():
            assert kv_matches(c.device_pool, adm.prefix, prompt, adm.salt), "a pinned prefix lost its KV"
            request += adm.own[::PS].tolist()
        owners = tree + request
        assert len(owners) == len(set(owners)), "a device page has two owners"
        used = (c.device_pool.allocator.used_pages() * PS).tolist()
        assert sorted(owners) == sorted(used), "device pages leaked or freed while owned"

    def teardown(self):
        if not hasattr(self, "cache"):
            return
        c = self.cache
        for prompt, adm in self.live.values():
            c.release(adm, prompt, 0)
        for rid in list(c.ongoing_prefetch):
            c.abort(rid)
        c.flush()
        owned_pages_ok(c)
        locks_balanced(c)
        empty_and_check(c, self.dev_total, self.host_total)


FrontDoorMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestFrontDoor = FrontDoorMachine.TestCase


def test_release_refuses_an_admission_that_is_not_ready():
    c = make_cache(device_pages=2, host_pages=0)
    adm = c.admit("big", list(range(40)))
    assert adm.status == "full" and not adm.ready
    try:
        c.release(adm, list(range(40)), 0)
    except ValueError as e:
        assert "release() takes a ready admission, not 'full'" in str(e)
    else:
        raise AssertionError("release of a full admission was accepted")
    assert len(c.device_pool.allocator.used_pages()) == 0
