"""Runs one real vLLM (``LLM``) on the CPU in its own process and prints what it served as one JSON line.

Usage: ``python run_vllm.py SPEC.json``. SPEC: ``model``, ``dtype``, ``block_size``, ``connector`` (the
kv_connector_extra_config for HiCacheConnector, or null for vLLM alone), ``conversations`` (each a list of turns,
each turn a list of token ids the user adds), ``max_tokens``, ``tp`` (tensor-parallel ranks, default 1), ``events``
(publish vLLM's KV events and report them). Turn k's prompt is the conversation so far (every earlier prompt and
answer) plus the turn's tokens. vLLM's own prefix cache is off unless ``prefix_caching``, so every cached token it
reports came through the connector."""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    ktc = None
    if spec.get("connector") is not None:
        ktc = KVTransferConfig(
            kv_connector=spec.get("connector_class", "HiCacheConnector"),
            kv_connector_module_path=spec.get("connector_module", "hicache_core.vllm"),
            kv_role="kv_both",
            kv_connector_extra_config=spec["connector"],
        )
    kec, sub = None, None
    if spec.get("events"):  # vLLM's KV events: vLLM's publisher binds a free port, a SUB socket here connects
        import socket

        import zmq
        from vllm.config import KVEventsConfig

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        kec = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{port}")
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 1024),
        block_size=spec.get("block_size", 32),
        enable_prefix_caching=spec.get("prefix_caching", False),
        enforce_eager=True,
        kv_transfer_config=ktc,
        seed=0,
        tensor_parallel_size=spec.get("tp", 1),
        kv_events_config=kec,
    )
    if kec is not None:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{port}")
        time.sleep(0.5)  # the subscription reaches the publisher before the first batch
    sp = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8), ignore_eos=True)
    convs = spec["conversations"]
    history = [[] for _ in convs]
    rounds = []
    for turn in range(max(len(c) for c in convs)):
        prompts, which = [], []
        for i, c in enumerate(convs):
            if turn < len(c):
                history[i] = history[i] + c[turn]
                prompts.append({"prompt_token_ids": history[i]})
                which.append(i)
        results = []
        for i, p in zip(which, prompts):  # one at a time: each TTFT is its own
            t0 = time.perf_counter()
            out = llm.generate(p, sp, use_tqdm=False)[0]
            dt = time.perf_counter() - t0
            toks = list(out.outputs[0].token_ids)
            history[i] = history[i] + toks
            results.append(
                {
                    "conv": i,
                    "prompt_len": len(p["prompt_token_ids"]),
                    "tokens": toks,
                    "cached": out.num_cached_tokens or 0,
                    "seconds": dt,
                }
            )
        rounds.append(results)
    print("RESULT " + json.dumps({"rounds": rounds, "events": _events(sub) if sub is not None else None}), flush=True)


def _events(sub) -> list[dict]:
    """Every event batch published so far, decoded by vLLM's own decoder, as plain dicts."""
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    out = []
    while sub.poll(2000):
        frames = sub.recv_multipart()
        for e in decoder.decode(frames[-1]).events:
            out.append(
                {
                    "type": type(e).__name__,
                    "medium": getattr(e, "medium", None),
                    "hashes": list(getattr(e, "block_hashes", [])),
                    "parent": getattr(e, "parent_block_hash", None),
                    "tokens": list(getattr(e, "token_ids", None) or []),
                }
            )
    return out


if __name__ == "__main__":
    main()
