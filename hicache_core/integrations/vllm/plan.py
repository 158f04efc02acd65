"""The scheduler half's bookkeeping, free of vLLM: which pages the worker's host tier holds (and where), which pages
storage was told to keep, and what each step asks the workers to move.

The scheduler owns the host tier's slots; the workers own the bytes. A slot is given to a page when the step that
saves it is planned, and the worker copies it during that step's forward, before any later step can load it. A
slot read by a load is pinned until the request is reported loaded, so eviction never hands it to a save while the
load still reads it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Optional


class LoadJob(NamedTuple):
    """Pages of one request to put into its vLLM blocks: page i comes from host slot ``slots[i]`` when that is
    >= 0, else from storage under ``keys[i]``."""

    req_id: str
    blocks: list[int]
    slots: list[int]
    keys: list[Optional[str]]


class StepPlan(NamedTuple):
    """What one step asks every worker to do (pickled to them with the scheduler's output)."""

    loads: list[LoadJob]
    saves: list[tuple[int, int]]  # (vLLM block, host slot): copied from the paged KV during this step's forward
    backups_before: list[tuple[int, str]]  # (host slot, key): to storage before this step overwrites the slot
    backups_after: list[tuple[int, str]]  # (host slot, key): to storage once this step's saves are in


class HostIndex:
    """Page key -> host slot, least recently used first; pinned slots are never evicted."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self._slot: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(pages - 1, -1, -1))
        self._pins: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: str) -> bool:
        return key in self._slot

    def run(self, keys: Sequence[str]) -> list[int]:
        """Slots of the longest run of ``keys`` from the start that the host tier holds."""
        out = []
        for k in keys:
            s = self._slot.get(k)
            if s is None:
                break
            out.append(s)
        return out

    def touch(self, keys: Iterable[str]) -> None:
        for k in keys:
            if k in self._slot:
                self._slot.move_to_end(k)

    def pin(self, slots: Iterable[int]) -> None:
        for s in slots:
            self._pins[s] = self._pins.get(s, 0) + 1

    def unpin(self, slots: Iterable[int]) -> None:
        for s in slots:
            n = self._pins.get(s, 0) - 1
            if n > 0:
                self._pins[s] = n
            else:
                self._pins.pop(s, None)

    def place(self, key: str) -> tuple[Optional[int], Optional[tuple[str, int]]]:
        """A slot for ``key`` (recorded as holding it), and the (key, slot) it evicted if any; (None, None) when
        every slot is pinned."""
        if self._free:
            slot = self._free.pop()
            self._slot[key] = slot
            return slot, None
        for old, slot in self._slot.items():
            if slot not in self._pins:
                del self._slot[old]
                self._slot[key] = slot
                return slot, (old, slot)
        return None, None


class StoredKeys:
    """Keys storage was asked to keep (or was found to hold), bounded: forgetting one only costs a second write."""

    def __init__(self, limit: int = 1 << 17) -> None:
        self.limit = limit
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._keys[k] = None
            self._keys.move_to_end(k)
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def discard(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._keys.pop(k, None)
