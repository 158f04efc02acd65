"""vLLM's KV-event wire format: an :class:`~hicache_core.events.EventBatch` as msgpack.

A batch is the array ``[ts, [event, ...], data_parallel_rank]``. An event is, in the ``map`` encoding (vLLM since
its events became self-describing: 0.30 and later), a map whose ``type`` is the event's class name, with every
required field present even when None and the optional ones (``extra_keys``) only when set; in the ``array``
encoding (older vLLM and the decoders written for it) the tagged array ``["BlockStored", block_hashes,
parent_block_hash, token_ids, block_size, lora_id, medium]`` / ``["BlockRemoved", block_hashes, medium]`` /
``["AllBlocksCleared"]``. hicache adds ``reason`` to a removal's map (decoders ignore fields they do not know);
the array form has no room for it. Needs ``msgpack`` (the ``events`` extra).
"""

from __future__ import annotations

from typing import Any

from hicache_core.errors import ConfigError
from hicache_core.events import AllBlocksCleared, BlockRemoved, BlockStored, Event, EventBatch

ENCODINGS = ("map", "array")


def msgpack_module() -> Any:
    try:
        import msgpack
    except ImportError:
        raise ConfigError(
            "KV events need msgpack and pyzmq: pip install 'hicache-core[events]' (or pip install msgpack pyzmq)"
        ) from None
    return msgpack


def event_obj(ev: Event, encoding: str = "map") -> Any:
    if encoding == "array":
        if isinstance(ev, BlockStored):
            return ["BlockStored", ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size, ev.lora_id,
                    ev.medium]  # fmt: skip
        if isinstance(ev, BlockRemoved):
            return ["BlockRemoved", ev.block_hashes, ev.medium]
        return ["AllBlocksCleared"]
    if isinstance(ev, BlockStored):
        out: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": ev.block_hashes,
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": ev.token_ids,
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
            "lora_name": ev.lora_name,
        }
        if ev.extra_keys is not None:
            out["extra_keys"] = ev.extra_keys
        return out
    if isinstance(ev, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": ev.block_hashes, "medium": ev.medium, "reason": ev.reason}
    return {"type": "AllBlocksCleared"}


def encode_batch(batch: EventBatch, encoding: str = "map") -> bytes:
    if encoding not in ENCODINGS:
        raise ConfigError(f"KV event encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
    obj = [batch.ts, [event_obj(e, encoding) for e in batch.events], batch.data_parallel_rank]
    return msgpack_module().packb(obj, use_bin_type=True)


def decode_event(obj: Any) -> Event:
    """One event in either encoding (what a subscriber of vLLM's or hicache's stream reads)."""
    if isinstance(obj, dict):
        kind = obj.get("type")
        if kind == "BlockStored":
            return BlockStored(
                list(obj["block_hashes"]),
                obj["parent_block_hash"],
                list(obj["token_ids"]),
                obj["block_size"],
                obj["medium"],
                obj.get("lora_id"),
                obj.get("lora_name"),
                obj.get("extra_keys"),
            )
        if kind == "BlockRemoved":
            return BlockRemoved(list(obj["block_hashes"]), obj["medium"], obj.get("reason", "evicted"))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
        raise ValueError(f"unknown KV event type {kind!r}")
    if isinstance(obj, (list, tuple)) and obj:
        if obj[0] == "BlockStored":
            return BlockStored(list(obj[1]), obj[2], list(obj[3]), obj[4], obj[6], obj[5])
        if obj[0] == "BlockRemoved":
            return BlockRemoved(list(obj[1]), obj[2] if len(obj) > 2 else None)  # type: ignore[arg-type]
        if obj[0] == "AllBlocksCleared":
            return AllBlocksCleared()
    raise ValueError(f"not a KV event: {obj!r:.200}")


def decode_batch(payload: bytes) -> EventBatch:
    ts, events, *rest = msgpack_module().unpackb(payload, raw=False)
    return EventBatch(ts, [decode_event(e) for e in events], rest[0] if rest else None)
