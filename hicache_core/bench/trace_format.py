"""The Mooncake trace format (JSONL records of timestamp, input_length, output_length, hash_ids; a hash id names
a 512-token block and everything before it): reading and checking a trace, turning records into token ids, the
ideal (infinite cache) hit rate, and synthetic traces of the conversation and tool-agent shapes. Used by
``hicache bench trace`` (:mod:`hicache_core.bench.trace`)."""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any, Optional

from hicache_core.errors import ConfigError

TRACE_BLOCK = 512  # tokens per hash id in the Mooncake format
SHAPES = ("conversation", "agent")


# --- the trace ----------------------------------------------------------------------------------------------------
def load(path: str, max_requests: Optional[int] = None) -> list[dict]:
    """The trace's records, checked: a bad line is named with what is wrong and how it should look."""
    shape = '{"timestamp": 0, "input_length": 1024, "output_length": 16, "hash_ids": [0, 1]}'
    out: list[dict] = []
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"trace {path!r}: {e.strerror or e}") from None
    with fh:
        for n, line in enumerate(fh, 1):
            if max_requests is not None and len(out) >= max_requests:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"trace {path}, line {n}: not JSON ({e}); each line is like {shape}") from None
            problem = _problem(rec)
            if problem:
                raise ConfigError(f"trace {path}, line {n}: {problem}; each line is like {shape}")
            out.append(rec)
    if not out:
        raise ConfigError(f"trace {path!r} holds no requests")
    return out


def _problem(rec: Any) -> Optional[str]:
    if not isinstance(rec, dict):
        return "not an object"
    for key in ("timestamp", "input_length", "output_length"):
        v = rec.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return f"{key} must be a number >= 0, not {v!r}"
    if rec["input_length"] < 1:
        return "input_length must be at least 1"
    ids = rec.get("hash_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return f"hash_ids must be a list of integers, not {ids!r}"
    if len(ids) * TRACE_BLOCK < rec["input_length"]:
        return (
            f"{len(ids)} hash_ids cover {len(ids) * TRACE_BLOCK} tokens, fewer than input_length {rec['input_length']}"
        )
    return None


def scaled(n: float, block: int) -> int:
    return max(1, math.ceil(n * block / TRACE_BLOCK))


def prompt_of(rec: dict, block: int, vocab: int, seed: int, blocks: dict[int, list[int]]) -> list[int]:
    """The request's token ids: its blocks' contents (each hash id's, the same everywhere), cut to its length."""
    length = scaled(rec["input_length"], block)
    out: list[int] = []
    for h in rec["hash_ids"]:
        if len(out) >= length:
            break
        content = blocks.get(h)
        if content is None:
            rng = random.Random(f"{seed}:{h}")
            content = blocks[h] = [rng.randrange(vocab) for _ in range(block)]
        out += content
    return out[:length]


def ideal_hits(records: list[dict], block: int) -> list[int]:
    """Per request, the tokens an infinite prefix cache would serve: the leading blocks whose ids an earlier
    request already had at the same place (ids name the prefix), leaving at least one token to compute."""
    seen: set[tuple[int, int]] = set()
    out = []
    for rec in records:
        length = scaled(rec["input_length"], block)
        ids = rec["hash_ids"][: math.ceil(length / block)]
        hit = 0
        for i, h in enumerate(ids):
            if (i, h) not in seen:
                break
            hit = min((i + 1) * block, length - 1)
        out.append(hit)
        seen.update(enumerate(ids))
    return out


# --- synthetic traces ---------------------------------------------------------------------------------------------
def generate(shape: str, sessions: int, turns: int, seed: int) -> list[dict]:
    """A trace of ``shape`` (see the module's docstring), records sorted by timestamp. A turn adds tokens (a
    question, tool output) to the session's context, whose full blocks keep their ids; the partial last block
    changes, so it and every block after it get new ids; the answer then joins the context."""
    rng = random.Random(seed)
    ids_from = itertools.count(1)
    agent = shape == "agent"
    system = [next(ids_from) for _ in range(6 if agent else 1)]  # tool definitions; a short preamble
    records = []
    for _ in range(sessions):
        t = rng.uniform(0, 5_000 if agent else 30_000)
        ids, length = list(system), len(system) * TRACE_BLOCK
        for _ in range(turns):
            keep = length // TRACE_BLOCK
            length += rng.randint(128, 2048) if agent else rng.randint(64, 1024)
            ids = ids[:keep]
            while len(ids) * TRACE_BLOCK < length:
                ids.append(next(ids_from))
            out_len = rng.randint(16, 120) if agent else rng.randint(64, 400)
            records.append({"timestamp": int(t), "input_length": length, "output_length": out_len, "hash_ids": ids})
            length += out_len
            t += rng.expovariate(1 / (4_000 if agent else 60_000))  # a tool call; a user thinking
    return sorted(records, key=lambda r: int(r["timestamp"]))
