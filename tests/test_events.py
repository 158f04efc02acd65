"""KV events: every tier's changes reach a real ZMQ subscriber in vLLM's wire format, replay after a dropped
subscriber, and a storage event never comes before the backup it announces has landed (the file backend, real
files)."""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from cache_helpers import PS, make_cache, run_request

from hicache_core.errors import ConfigError
from hicache_core.events import CPU, GPU, STORAGE, BlockRemoved, BlockStored, block_hash
from hicache_core.events.publisher import END_SEQ, KVEventsConfig, ZmqPublisher
from hicache_core.events.wire import decode_batch
from hicache_core.keys import hash_chain

PROMPT = list(range(100, 100 + 4 * PS))


class Subscriber:
    """A plain ZMQ SUB socket as a router would open one; decodes every message."""

    def __init__(self, endpoint: str, topic: str = "") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sock.connect(endpoint)
        self.seqs: list[int] = []
        self.events: list = []

    def drain(self, timeout: float = 0.3) -> list:
        got = []
        while self.sock.poll(int(timeout * 1000)):
            topic, seq, payload = self.sock.recv_multipart()
            self.seqs.append(int.from_bytes(seq, "big"))
            got += decode_batch(payload).events
        self.events += got
        return got

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def replay(endpoint: str, start: int) -> list[tuple[int, bytes]]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    s.send_multipart([b"", start.to_bytes(8, "big")])
    out = []
    try:
        while True:
            assert s.poll(5000), "no replay answer"
            _, topic, seq, payload = s.recv_multipart()
            if seq == END_SEQ:
                return out
            out.append((int.from_bytes(seq, "big"), payload))
    finally:
        s.close(0)
        ctx.term()


@pytest.fixture
def publisher():
    pubs = []

    def make(**kw) -> ZmqPublisher:
        cfg = KVEventsConfig(
            enable_kv_cache_events=True, endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*", **kw
        )
        pubs.append(ZmqPublisher(cfg))
        return pubs[-1]

    yield make
    for p in pubs:
        p.close()


def wait_for(sub: Subscriber, pred, timeout: float = 10.0, poll=None) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if poll:
            poll()
        sub.drain(0.05)
        if pred(sub.events):
            return sub.events
    raise AssertionError(f"events never arrived; got {sub.events}")


def stored(events, medium):
    return [e for e in events if isinstance(e, BlockStored) and e.medium == medium]


def test_every_tier_reaches_a_zmq_subscriber_and_replays(tmp_path, publisher):
    pub = publisher(topic="hicache")
    cache = make_cache(device_pages=6, host_pages=16, storage="file", extra={"storage_dir": str(tmp_path)})
    cache.fleet.subscribe_events(pub)
    sub = Subscriber(pub.endpoint, "hicache")
    time.sleep(0.3)  # a SUB socket misses what is sent before it has joined (ZMQ's slow joiner)
    try:
        run_request(cache, PROMPT)
        cache.flush()
        keys = hash_chain(PROMPT, PS)
        ids = [block_hash(k) for k in keys]
        evs = wait_for(sub, lambda ev: stored(ev, STORAGE), poll=cache.poll)
        for medium in (GPU, CPU, STORAGE):
            got = stored(evs, medium)
            assert got, f"no {medium} event"
            assert [h for e in got for h in e.block_hashes] == ids
            assert [t for e in got for t in e.token_ids] == PROMPT
            assert all(e.block_size == PS and e.parent_block_hash is None for e in got)
        # the device tier is filled by others: the prompt's pages are demoted to host, then dropped from host too
        for i in range(6):
            run_request(cache, [1000 * (i + 1) + j for j in range(5 * PS)], rid=f"other{i}")
        cache.flush()
        evs = wait_for(
            sub,
            lambda ev: any(isinstance(e, BlockRemoved) and e.medium == CPU and ids[0] in e.block_hashes for e in ev),
            poll=cache.poll,
        )
        demoted = [e for e in evs if isinstance(e, BlockRemoved) and e.medium == GPU and ids[0] in e.block_hashes]
        assert demoted and demoted[0].reason == "demoted"
        # a subscriber that dropped asks the replay socket for everything from the start: the same batches
        assert sub.seqs == list(range(len(sub.seqs)))
        replayed = replay(pub.replay_endpoint, 0)
        assert [s for s, _ in replayed] == sub.seqs
        assert [e for _, p in replayed for e in decode_batch(p).events] == sub.events
        assert [s for s, _ in replay(pub.replay_endpoint, 3)] == sub.seqs[3:]
    finally:
        sub.close()
        cache.close()


class GatedWrites:
    """The file backend with its writes held until the test opens the gate."""

    def __init__(self, inner) -> None:
        self.inner, self.gate = inner, threading.Event()

    def batch_set_v1(self, *a, **kw):
        assert self.gate.wait(30)
        return self.inner.batch_set_v1(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_storage_event_never_precedes_its_backup(tmp_path, publisher):
    pub = publisher()
    cache = make_cache(device_pages=8, host_pages=16, storage="file", extra={"storage_dir": str(tmp_path)})
    gated = cache.operator.wrap_storage(GatedWrites)
    cache.fleet.subscribe_events(pub)
    sub = Subscriber(pub.endpoint)
    time.sleep(0.3)
    try:
        run_request(cache, PROMPT)
        keys = hash_chain(PROMPT, PS)
        wait_for(sub, lambda ev: stored(ev, CPU), poll=cache.poll)
        for _ in range(20):  # the host copy landed, the backup is held: no storage event may come
            cache.poll()
            sub.drain(0.02)
        assert not stored(sub.events, STORAGE)
        assert not any(gated.inner.batch_exists(keys[:1]) for _ in [0])
        gated.gate.set()
        evs = wait_for(sub, lambda ev: stored(ev, STORAGE), poll=cache.poll)
        # the moment the event is read, every page it names is in the store
        assert gated.inner.batch_exists(keys) == len(keys)
        assert [h for e in stored(evs, STORAGE) for h in e.block_hashes] == [block_hash(k) for k in keys]
        cache.operator.detach_storage()
        evs = wait_for(sub, lambda ev: any(isinstance(e, BlockRemoved) and e.medium == STORAGE for e in ev))
        gone = [e for e in evs if isinstance(e, BlockRemoved) and e.medium == STORAGE]
        assert gone[0].reason == "detached" and gone[0].block_hashes == [block_hash(k) for k in keys]
    finally:
        sub.close()
        cache.close()


def test_salted_pages_carry_their_salt_and_flush_says_so(publisher):
    cache = make_cache(device_pages=8, host_pages=16)
    got: list = []
    cache.fleet.subscribe_events(lambda batch: got.extend(batch.events))  # an embedder's callback: the front door
    run_request(cache, PROMPT, salt="tenant-a")
    cache.flush()
    cache.poll()
    dev = stored(got, GPU)
    assert dev and dev[0].extra_keys == [["tenant-a"]] * len(dev[0].block_hashes)
    assert dev[0].parent_block_hash is None  # the namespace's seed is no page
    cache.operator.empty_local_tiers()
    removed = [e for e in got if isinstance(e, BlockRemoved)]
    assert removed and {e.reason for e in removed} == {"flushed"}
    cache.close()


def test_array_encoding_for_older_decoders():
    import msgpack

    from hicache_core.events import EventBatch
    from hicache_core.events.wire import encode_batch

    b = EventBatch(1.5, [BlockStored([7], None, [1, 2], 2, CPU), BlockRemoved([7], CPU, "evicted")], 0)
    assert msgpack.unpackb(encode_batch(b, "array")) == [
        1.5,
        [["BlockStored", [7], None, [1, 2], 2, None, "CPU"], ["BlockRemoved", [7], "CPU"]],
        0,
    ]
    assert decode_batch(encode_batch(b, "map")).events == b.events


@pytest.mark.parametrize(
    "text, says",
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"enable_kv_cache_events": true, "endpont": "tcp://*:1"}', "unknown key(s) endpont"),
        ('{"buffer_steps": 0}', "positive integer"),
        ('{"publisher": "kafka"}', "zmq or null"),
        ('{"encoding": "json"}', "map, array"),
        ('{"endpoint": "localhost:5557"}', "not a ZMQ endpoint"),
    ],
)
def test_bad_kv_events_config_says_what(text, says):
    with pytest.raises(ConfigError, match=None) as e:
        KVEventsConfig.from_json(text)
    assert says in str(e.value)
