"""The fleet over HTTP against a real `hicache serve`: KV events to a real ZMQ subscriber (--kv-events-config,
the publisher connecting to the subscriber's bound socket as vLLM's does for a non-wildcard endpoint, replay on an
ipc socket), POST /hicache/prefetch restoring a prompt from the file store into host before its turn, and a
session's retention hint answered in meta_info and released by DELETE /hicache/sessions/{id}."""

from __future__ import annotations

import json
import time

import zmq

from hicache_core.events import GPU, STORAGE, BlockRemoved, BlockStored
from hicache_core.events.publisher import END_SEQ
from hicache_core.events.wire import decode_batch

from conftest import serve

PROMPT = "".join(f"turn {i}: the agent calls a tool and waits for its answer before it goes on. " for i in range(8))


def body(**kw):
    return {"text": PROMPT, "sampling_params": {"max_new_tokens": 2, "temperature": 0}, **kw}


def drain(sock, events, until, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            _, seq, payload = sock.recv_multipart()
            events.append((int.from_bytes(seq, "big"), decode_batch(payload).events))
        if until([e for _, evs in events for e in evs]):
            return [e for _, evs in events for e in evs]
    raise AssertionError(f"the events never came: {events}")


def replay(ctx, endpoint: str) -> list:
    """Every batch the server keeps, from sequence 0, as a dropped subscriber would ask for them."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    out = []
    try:
        while True:
            assert dealer.poll(10_000), "no replay answer"
            _, topic, seq, payload = dealer.recv_multipart()
            if seq == END_SEQ:
                return out
            assert topic == b"kv"
            out.append((int.from_bytes(seq, "big"), decode_batch(payload).events))
    finally:
        dealer.close(0)


def test_events_restore_and_retention_over_http(tmp_path):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.bind("tcp://127.0.0.1:*")
    endpoint = sub.getsockopt(zmq.LAST_ENDPOINT).decode()
    replay_ep = f"ipc://{tmp_path}/replay.sock"
    events_cfg = {"enable_kv_cache_events": True, "endpoint": endpoint, "replay_endpoint": replay_ep, "topic": "kv"}
    flags = [
        "--page-size",
        "16",
        "--enable-cache-report",
        "--enable-hierarchical-cache",
        "--hicache-storage-backend",
        "file",
        "--hicache-storage-backend-extra-config",
        json.dumps({"storage_dir": str(tmp_path / "store"), "prefetch_threshold": 16}),
        "--kv-events-config",
        json.dumps(events_cfg),
    ]
    got: list = []
    try:
        with serve(tmp_path, *flags) as s:
            time.sleep(0.5)  # the publisher connects to us
            m = s.generate(body(retention_seconds=120, retention_priority=2, session_id="agent-1"))["meta_info"]
            assert m["retention"]["status"] == "accepted" and m["retention"]["tokens"] > 0, m["retention"]
            n = m["prompt_tokens"] // 16 * 16
            drain(sub, got, lambda ev: any(isinstance(e, BlockStored) and e.medium == STORAGE for e in ev))
            # the publisher connects to us: batches sent before the connection was up are the replay's to give
            evs = [e for _, batch in replay(ctx, replay_ep) for e in batch]
            gpu = [e for e in evs if isinstance(e, BlockStored) and e.medium == GPU]
            assert gpu[0].parent_block_hash is None and len(gpu[0].token_ids) == len(gpu[0].block_hashes) * 16
            assert sum(len(e.token_ids) for e in gpu) >= n
            # flushed: the local tiers' pages go, and say so
            assert s.post("/flush_cache", {})[0] == 200
            drain(sub, got, lambda ev: any(isinstance(e, BlockRemoved) and e.reason == "flushed" for e in ev))
            # the tool gap: restore the prompt from storage before the next turn
            status, op = s.post("/hicache/prefetch", {"text": PROMPT, "operation_id": "gap-1", "ttl_seconds": 30})
            assert status == 200 and op["state"] in ("running", "success"), op
            deadline = time.monotonic() + 30
            while op["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
                op = s.get("/hicache/prefetch/gap-1")
            assert op["state"] == "success" and op["restored_tokens"] >= n - 16, op
            m = s.generate(body())["meta_info"]
            assert m["cached_tokens_details"]["host"] >= n - 16 and m["cached_tokens_details"]["storage"] == 0, m
            # answers that say what went wrong
            assert s.post("/hicache/prefetch", {"text": PROMPT, "ttl": 5})[0] == 400
            assert s.post("/hicache/prefetch", {"input_ids": [], "ttl_seconds": 5})[0] == 400
            assert s.post("/hicache/prefetch/nope", {}, method="DELETE")[0] == 404
            status, op = s.post("/hicache/prefetch", {"text": PROMPT, "ttl_seconds": 10**9})
            assert status == 200 and op["state"] == "cached" and op["notes"] == ["ttl clipped to 3600 s"], op
            assert [g["key"] for g in s.get("/hicache/sessions")["retained"]] == ["agent-1"]
            status, ans = s.post("/hicache/sessions/agent-1", {}, method="DELETE")
            assert status == 200 and ans["status"] == "released", ans
            assert s.post("/hicache/sessions/agent-1", {}, method="DELETE")[0] == 404
            # what the live stream gave is what the replay socket keeps under the same sequence numbers
            replayed = replay(ctx, replay_ep)
            assert [q for q, _ in replayed] == list(range(len(replayed)))
            assert all(replayed[q][1] == events for q, events in got)
    finally:
        sub.close(0)
        ctx.term()


def test_bad_kv_events_flags_fail_before_serving(capsys):
    from hicache_core.cli import main
    from hicache_core.testing.cli import assert_clear_cli_error

    bad = '{"enable_kv_cache_events": true, "endpont": "tcp://*:5557"}'
    assert_clear_cli_error(main, ["serve", "--kv-events-config", bad], "unknown key(s) endpont", capsys)
    assert_clear_cli_error(main, ["serve", "--kv-events-config", "{"], "not valid JSON", capsys)
    ok = '{"enable_kv_cache_events": true, "endpoint": "tcp://127.0.0.1:5999"}'
    assert_clear_cli_error(
        main,
        ["serve", "--disable-radix-cache", "--port", "0", "--kv-events-config", ok],
        "needs a prefix cache",
        capsys,
    )
    assert_clear_cli_error(main, ["serve", "--hicache-retention-ratio", "2"], "between 0 and 1", capsys)
