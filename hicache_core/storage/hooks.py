"""The optional methods a backend offers to hicache's tools, declared once. None is needed to serve; each lets a
tool do more with the backend (docs/writing-a-backend.md). Tools test for one with ``isinstance(raw, Hook)``
on the backend as constructed (a handle's ``raw``), never by probing names."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Optional, Protocol, runtime_checkable


@runtime_checkable
class Describes(Protocol):
    def describe(self) -> str:
        """Where the backend keeps its pages, in its own words (``hicache check`` prints it)."""
        ...


@runtime_checkable
class FailingWrites(Protocol):
    def failing_writes(self) -> AbstractContextManager[None]:
        """A context inside which writes fail for real (a full disk, a dead server): the conformance kit and
        ``hicache certify`` check that a failed write never becomes visible."""
        ...


@runtime_checkable
class CorruptsStoredPages(Protocol):
    def corrupt_stored_page(self, key: str) -> bool:
        """Damage the stored copy of ``key`` as a bad disk would (True if there was one): the backend must then
        answer a miss for it (certify's and the soak's ``corrupt`` fault)."""
        ...


@runtime_checkable
class HasBenchBaseline(Protocol):
    def bench_baseline(self) -> Any:
        """The plain loop ``hicache bench storage`` holds the backend to (raw file I/O, the raw client): an object
        with ``set(keys, host_indices)`` / ``get(keys, host_indices)`` over the same host pool, and ``close()``."""
        ...


@runtime_checkable
class HasBenchPeer(Protocol):
    def bench_peer(self) -> Optional[Any]:
        """Another implementation to compare with where one is importable (SGLang's HiCacheFile), same shape as
        the baseline; None where it is not."""
        ...


def holds_namespace_quota(raw: Any) -> bool:
    """Whether the backend counts and trims one namespace's pages across processes (``supports_namespace_quota =
    True``), as ``--hicache-salt-storage-pages`` needs."""
    return getattr(raw, "supports_namespace_quota", False) is True
