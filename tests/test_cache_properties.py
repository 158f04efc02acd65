"""Property-based tests of the tree: any sequence of requests, evictions, prefetches and aborts keeps the
invariants -- balanced locks, every page owned once or free, exact bytes on every match, free counts restored."""

import uuid

import hypothesis.strategies as st
from cache_helpers import PS, empty_and_check, kv_matches, locks_balanced, make_cache, owned_pages_ok, run_request
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

PAGES = st.lists(st.integers(0, 3), min_size=1, max_size=5)


def tokens_of(pages: list[int]) -> list[int]:
    return [p * 10 + j for p in pages for j in range(PS)]


class TieredCacheMachine(RuleBasedStateMachine):
    @initialize(
        policy=st.sampled_from(["write_through", "write_through_selective", "write_back"]),
        prefetch=st.sampled_from(["best_effort", "wait_complete", "timeout"]),
        layout=st.sampled_from(["layer_first", "page_first", "page_first_direct"]),
        eviction=st.sampled_from(["lru", "lfu", "fifo"]),
    )
    def setup(self, policy, prefetch, layout, eviction):
        self.store = uuid.uuid4().hex
        self.cache = make_cache(
            device_pages=8,
            host_pages=12,
            storage="memory",
            store=self.store,
            write_policy=policy,
            prefetch=prefetch,
            layout=layout,
            eviction=eviction,
        )
        self.dev_total = self.cache.device_pool.available_size()
        self.host_total = self.cache.host_pool.available_size()
        self.n = 0

    @rule(pages=PAGES)
    def request(self, pages):
        self.n += 1
        run_request(self.cache, tokens_of(pages), rid=f"r{self.n}")  # asserts served bytes

    @rule(pages=PAGES)
    def match_is_exact(self, pages):
        toks = tokens_of(pages)
        m = self.cache.match_prefix(toks)
        assert kv_matches(self.cache.device_pool, m.device_indices, toks)

    @rule(n=st.integers(1, 40))
    def evict_device(self, n):
        self.cache.evict(n)

    @rule(n=st.integers(1, 40))
    def evict_host(self, n):
        self.cache.flush()
        self.cache.evict_host(n)

    @rule(pages=PAGES)
    def admit_then_abort(self, pages):
        """A client gone while its request waited (prefetch in flight), or right after admission."""
        toks = tokens_of(pages)
        self.n += 1
        adm = self.cache.admit(f"a{self.n}", toks)
        if adm.ready:
            self.cache.release(adm, toks, 0)
        else:
            self.cache.abort(f"a{self.n}")

    @precondition(lambda self: hasattr(self, "cache"))
    @invariant()
    def pages_and_locks(self):
        self.cache.flush()
        assert not self.cache.ongoing_prefetch
        owned_pages_ok(self.cache)
        locks_balanced(self.cache)

    def teardown(self):
        if hasattr(self, "cache"):
            empty_and_check(self.cache, self.dev_total, self.host_total)


TieredCacheMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestTieredCache = TieredCacheMachine.TestCase
