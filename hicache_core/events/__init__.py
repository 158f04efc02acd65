"""KV events: what each tier now holds, for routers and embedders, in vLLM's event model.

The cache's parts report each change of a page's residence as it happens (on the owner thread):
:class:`BlockStored` when pages land in a tier, :class:`BlockRemoved` when they leave it (with the reason:
``evicted``, ``demoted`` to a lower tier, ``flushed`` by an operator, ``detached`` with its storage backend),
:class:`AllBlocksCleared` when everything goes. A tier is vLLM's ``medium``: ``GPU`` (the device tier, whatever the
device), ``CPU`` (host) and ``STORAGE`` (the L3 backend). A storage ``BlockStored`` is reported only once the
backup has landed (on every tensor-parallel rank): a router told a page is in storage can send a request to any
instance on that store.

:meth:`KVEvents.flush` hands what was collected since the last flush to every subscriber as one
:class:`EventBatch` (the cache flushes once per ``poll``, i.e. once per scheduler step). Subscribers are plain
callables: :class:`~hicache_core.events.publisher.ZmqPublisher` puts each batch on the wire in vLLM's format;
an embedder passes its own to :meth:`~hicache_core.cache.hiradix.HiRadixCache.subscribe_events`.

Block hashes are hicache's page keys (SGLang's SHA-256 chain, :mod:`hicache_core.keys`), sent as vLLM sends its
own by default: the digest's low 64 bits as an integer (``int_hashes``), or the 32 raw bytes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

import attrs

logger = logging.getLogger(__name__)

GPU, CPU, STORAGE = "GPU", "CPU", "STORAGE"  # vLLM's medium names: device, host, storage
MEDIA = (GPU, CPU, STORAGE)
REASONS = ("evicted", "demoted", "flushed", "detached")

BlockHash = Union[int, bytes]
MAX_TRACKED_STORAGE = 4_000_000  # storage pages remembered for a detach's BlockRemoved (~0.3 GB of ints at most)


@attrs.frozen
class BlockStored:
    """Pages now held in ``medium``: ``block_hashes`` one per page, chained on ``parent_block_hash`` (None at the
    start of a prompt), ``token_ids`` the tokens of all the pages in order. ``extra_keys``: per page, the request
    namespace's ``cache_salt`` and ``extra_key`` (None without one)."""

    block_hashes: list[BlockHash]
    parent_block_hash: Optional[BlockHash]
    token_ids: list[int]
    block_size: int
    medium: str
    lora_id: Optional[int] = None
    lora_name: Optional[str] = None
    extra_keys: Optional[list[Optional[list[str]]]] = None


@attrs.frozen
class BlockRemoved:
    block_hashes: list[BlockHash]
    medium: str
    reason: str = "evicted"


@attrs.frozen
class AllBlocksCleared:
    pass


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@attrs.frozen
class EventBatch:
    ts: float
    events: list[Event]
    data_parallel_rank: Optional[int] = None


def block_hash(key: str, int_hashes: bool = True) -> BlockHash:
    """A page key (hex SHA-256) as an event's block hash: its low 64 bits as an integer (vLLM's default,
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``) or its 32 raw bytes."""
    return int(key[-16:], 16) if int_hashes else bytes.fromhex(key)


class KVEvents:
    """Collects the cache's events between flushes and hands each batch to the subscribers. Owner thread only."""

    def __init__(self, block_size: int, *, int_hashes: bool = True, data_parallel_rank: Optional[int] = None) -> None:
        self.block_size = block_size
        self.int_hashes = int_hashes
        self.data_parallel_rank = data_parallel_rank
        self._subscribers: list[Callable[[EventBatch], None]] = []
        self._pending: list[Event] = []
        self._reason: Optional[str] = None
        self._namespaces: dict[str, list[str]] = {}  # seed -> [cache_salt, extra_key] as sent by requests
        self._in_storage: dict[BlockHash, None] = {}  # storage pages announced (ordered), for a detach's removal
        self.published = 0  # batches handed out

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self, fn: Callable[[EventBatch], None]) -> Callable[[], None]:
        """Call ``fn(batch)`` with every batch from now on; returns a function that unsubscribes."""
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

        return unsubscribe

    def name_namespace(self, seed: Optional[str], salt: Optional[str], extra_key: Optional[str]) -> None:
        """Remember what a namespace's seed stands for, so its pages' events carry the request's salt."""
        if seed is not None and seed not in self._namespaces:
            self._namespaces[seed] = [x for x in (salt, extra_key) if x is not None]

    @contextlib.contextmanager
    def reason(self, why: str) -> Iterator[None]:
        """Removals inside the block say ``why`` (``flushed``, ``detached``) instead of what the tier says."""
        if why not in REASONS:
            raise ValueError(f"removal reason {why!r}: one of {', '.join(REASONS)}")
        prior, self._reason = self._reason, why
        try:
            yield
        finally:
            self._reason = prior

    # --- what the tiers report -----------------------------------------------------------------------------------
    def stored(
        self,
        keys: list[str],
        parent: Optional[str],
        tokens: list[int],
        medium: str,
        seed: Optional[str] = None,
    ) -> None:
        """``keys`` (one per page of ``tokens``) landed in ``medium``; ``parent``: the key of the page before them
        (None at a prompt's start, or a namespace's seed, which is no page)."""
        if not self._subscribers or not keys:
            return
        n = len(keys) * self.block_size
        names = self._namespaces.get(seed) if seed is not None else None
        self._pending.append(
            BlockStored(
                [block_hash(k, self.int_hashes) for k in keys],
                None if parent is None or parent == seed else block_hash(parent, self.int_hashes),
                list(tokens[:n]),
                self.block_size,
                medium,
                extra_keys=[list(names) for _ in keys] if names else None,
            )
        )
        if medium == STORAGE:
            self._in_storage.update(dict.fromkeys(self._pending[-1].block_hashes))  # type: ignore[union-attr]
            while len(self._in_storage) > MAX_TRACKED_STORAGE:  # the oldest go untracked (a detach omits them)
                del self._in_storage[next(iter(self._in_storage))]

    def removed(self, keys: list[str], medium: str, reason: str) -> None:
        if not self._subscribers or not keys:
            return
        self._pending.append(
            BlockRemoved([block_hash(k, self.int_hashes) for k in keys], medium, self._reason or reason)
        )

    def storage_detached(self) -> None:
        """The storage backend went away: every storage page announced is no longer reachable from here."""
        hashes, self._in_storage = list(self._in_storage), {}
        if self._subscribers and hashes:
            self._pending.append(BlockRemoved(hashes, STORAGE, "detached"))

    def cleared(self) -> None:
        if self._subscribers:
            self._pending.append(AllBlocksCleared())
        self._in_storage.clear()

    # --- out ---------------------------------------------------------------------------------------------------
    def flush(self) -> Optional[EventBatch]:
        """Hand the events collected since the last flush to every subscriber as one batch (none if empty). A
        subscriber that raises is logged and kept: it must not stop the cache."""
        if not self._pending:
            return None
        batch = EventBatch(time.time(), self._pending, self.data_parallel_rank)
        self._pending = []
        for fn in list(self._subscribers):
            try:
                fn(batch)
            except Exception:
                logger.exception("kv events: subscriber %r failed on a batch of %d events", fn, len(batch.events))
        self.published += 1
        return batch

    def close(self) -> None:
        self.flush()
        for fn in list(self._subscribers):
            closer: Any = getattr(fn, "close", None)
            if callable(closer):
                closer()
        self._subscribers.clear()
