"""The one layer between the controller and a backend it does not trust: deadlines and result checks.

Every backend call the controller makes goes through :class:`GuardedStorage`:

* **Deadline.** The call runs on a daemon thread of the guard's; the caller waits at most ``timeout_s``. A call past
  it is *abandoned*: the caller treats the batch as failed (the request recomputes) and gets the call's
  :class:`Call` back, so it can keep the host pages that call targets out of reuse until the call really returns
  (a late write must never land in memory that holds another page by then). While ``max_abandoned`` calls are still
  out, the backend counts as hung and new calls fail at once instead of waiting out the deadline again -- but for
  one *probe* call now and then (after ``timeout_s``, then twice as long each time, at most :data:`MAX_PROBE_S`). A
  call that returns in time shows the backend answers again: calls flow, while the ones still out keep their pages
  quarantined until they return (a client whose server died mid-call may never return them; its plugin may have
  rebuilt the client meanwhile, and the backend must not stay shut for the old client's sake).
* **Results.** ``batch_exists`` must give an int in ``[0, len(keys)]``; ``batch_get_v1`` / ``batch_set_v1`` a list
  or tuple of exactly ``len(keys)`` booleans. Anything else fails the whole batch.

Every failure is counted in the metrics by kind (``{op}_exception``, ``{op}_deadline``, ``{op}_invalid_result``,
``backend_hung``) and logged once per kind, so a broken backend cannot flood the log. Nothing raised by a
backend escapes: worker threads never die of it.

A call that holds the GIL while it blocks (a C extension that does not release it) cannot be interrupted by any
thread: such a backend must bound its own calls (the mooncake plugin probes its master before connecting).
"""

from __future__ import annotations

import logging
import operator
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from hicache_core.threads import background_thread

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ABANDONED = 2
MAX_PROBE_S = 300.0  # while a backend counts as hung, one call goes through at most this far apart


class Call:
    """One backend call handed to a guard thread."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn: Optional[Callable] = fn
        self.args: Optional[tuple] = args
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self._callbacks: list[Callable[[Call], None]] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        # The thread lets go of the arguments before the caller wakes, and the caller takes the result and error
        # (:meth:`take`): the last reference to a tensor must not die on this thread. A tensor freed here drops the
        # GIL; should the interpreter be finalizing by then, CPython ends the thread by a forced unwind that
        # torch's noexcept destructor turns into std::terminate -- `hicache check` aborted ~1 exit in 8 so.
        fn, args = self.fn, self.args
        self.fn = self.args = None
        assert fn is not None and args is not None, "a call runs once"
        try:
            self.result = fn(*args)
        except BaseException as e:  # reported to the caller, never raised in the guard's thread
            self.error = e
        del fn, args
        with self._lock:
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb(self)
            except Exception:
                logger.exception("storage guard: completion callback failed")

    def take(self) -> tuple[Any, Optional[BaseException]]:
        """The result and the error, which the call no longer holds."""
        result, error, self.result, self.error = self.result, self.error, None, None
        return result, error

    def on_done(self, cb: Callable[[Call], None]) -> None:
        """Run ``cb(call)`` once the call has returned (at once if it has)."""
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(cb)
                return
        cb(self)


class _Threads:
    """Daemon threads that run calls; a thread stuck in a hung call is replaced, so a hang costs one thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._q: queue.SimpleQueue[Optional[Call]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._count = 0
        self._threads: list[threading.Thread] = []

    def submit(self, call: Call) -> None:
        with self._lock:
            if self._idle == 0:
                self._count += 1
                t = threading.Thread(target=self._loop, name=f"{self.name}-{self._count}", daemon=True)
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
                t.start()
            else:
                self._idle -= 1
        self._q.put(call)

    def _loop(self) -> None:
        background_thread()
        me = threading.current_thread()
        while True:
            call = self._q.get()
            if call is None:
                return
            me.hicache_call = call  # type: ignore[attr-defined]  # stop() does not wait for one stuck in a call
            call.run()
            with self._lock:
                self._idle += 1

    def stop(self, join_s: float = 2.0) -> None:
        """Every thread leaves once its call is done; wait up to ``join_s`` for them (one stuck in a hung call
        stays behind, a daemon). Threads must be gone before the interpreter finalizes (see :meth:`Call.run`)."""
        with self._lock:
            threads, self._threads, self._idle = self._threads, [], 0
        for _ in threads:
            self._q.put(None)
        deadline = time.monotonic() + join_s
        for t in threads:
            busy = getattr(t, "hicache_call", None)
            if busy is None or busy.done.is_set():
                t.join(max(0.0, deadline - time.monotonic()))


class Outcome:
    """What a guarded batch call gave: ``ok`` pages succeeded from the start; ``abandoned`` is the call still
    running past its deadline (its target pages must stay out of reuse until ``abandoned.done``)."""

    __slots__ = ("ok", "abandoned", "answered")

    def __init__(self, ok: int, abandoned: Optional[Call] = None, answered: bool = True) -> None:
        self.ok, self.abandoned, self.answered = ok, abandoned, answered


class GuardedStorage:
    """A backend (speaking v1) behind deadlines and result checks; see the module doc."""

    def __init__(
        self,
        backend: Any,
        metrics: Any,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_abandoned: int = DEFAULT_MAX_ABANDONED,
        name: Optional[str] = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.max_abandoned = max(1, max_abandoned)
        self.name = name or getattr(backend, "name", None) or type(backend).__name__
        self._threads = _Threads("hicache-storage-call")
        self._lock = threading.Lock()
        self._abandoned: dict[Call, float] = {}  # -> when it was abandoned
        self._revived_at = 0.0  # when a probe last returned in time: calls abandoned before it do not count
        self._probe_at = 0.0  # while hung: when the next probe may go
        self._probe_gap = timeout_s
        self._logged: set[str] = set()
        self._closing = threading.Event()
        self.last_failure: Optional[str] = None  # the latest failure, in words (``hicache check`` prints it)

    # --- bookkeeping -------------------------------------------------------------------------------------------------
    def _fail(self, kind: str, message: str) -> None:
        self.metrics.record_storage_error(kind)
        self.last_failure = message
        with self._lock:
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            logger.warning(
                "storage backend %s: %s (logged once; counted as storage error %r)", self.name, message, kind
            )

    def abandoned_calls(self) -> int:
        with self._lock:
            return len(self._abandoned)

    def _forget(self, call: Call) -> None:
        with self._lock:
            self._abandoned.pop(call, None)

    def _hung(self) -> tuple[bool, bool]:
        """(hung, this call is a probe): hung while ``max_abandoned`` calls abandoned since the last revival are out;
        then one call now and then goes as a probe."""
        with self._lock:
            late = sum(1 for t in self._abandoned.values() if t >= self._revived_at)
            if late < self.max_abandoned:
                return False, False
            now = time.monotonic()
            if not self._probe_at:
                self._probe_at = now + self._probe_gap
            if now < self._probe_at:
                return True, False
            self._probe_gap = min(MAX_PROBE_S, self._probe_gap * 2)
            self._probe_at = now + self._probe_gap
            return False, True

    def _revived(self) -> None:
        """A probe returned in time: the backend answers again (its old calls still out stay quarantined)."""
        with self._lock:
            self._revived_at = time.monotonic()
            self._probe_at, self._probe_gap = 0.0, self.timeout_s
        logger.warning("storage backend %s: a probe call returned in time: calls go to it again", self.name)

    def _call(self, op: str, fn: Callable, *args: Any, force: bool = False) -> tuple[bool, Any, Optional[Call]]:
        """(returned in time without raising, result, the call if abandoned). ``force``: try even a hung backend."""
        hung, probe = self._hung() if self.timeout_s else (False, False)
        if hung and not force:
            self._fail(
                "backend_hung",
                f"{self.max_abandoned} calls past the {self.timeout_s:g} s deadline have "
                "not returned: failing calls at once until they do, or a probe call returns in time",
            )
            return False, None, None
        if self._closing.is_set():
            return False, None, None
        if not self.timeout_s:
            call = Call(fn, args)
            call.run()
        else:
            call = Call(fn, args)
            self._threads.submit(call)
            deadline = time.monotonic() + self.timeout_s
            while not call.done.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                if self._closing.is_set() or time.monotonic() >= deadline:
                    break
            if not call.done.is_set():
                with self._lock:
                    self._abandoned[call] = time.monotonic()
                call.on_done(self._forget)
                self._fail(
                    f"{op}_deadline",
                    f"{op} did not return within {self.timeout_s:g} s: abandoned (the "
                    "request recomputes; its host pages stay reserved until the call returns)",
                )
                return False, None, call
        if probe:
            self._revived()
        result, e = call.take()
        if e is not None:
            self._fail(f"{op}_exception", f"{op} raised {type(e).__name__}: {e}")
            return False, None, None
        return True, result, None

    # --- the calls ---------------------------------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra: Any = None) -> Outcome:
        """``extra``: an :class:`~hicache_core.storage.base.ExtraInfo` for the backend (prefix keys), or None."""
        ok, result, abandoned = self._call("exists", self.backend.batch_exists, keys, *_opt(extra))
        if not ok:
            return Outcome(0, abandoned, answered=False)
        try:
            if isinstance(result, bool):
                raise TypeError("a bool")
            n = operator.index(result)
        except TypeError:
            self._fail("exists_invalid_result", f"batch_exists returned {_show(result)}, not an int count of keys")
            return Outcome(0, answered=False)
        if not 0 <= n <= len(keys):
            self._fail("exists_invalid_result", f"batch_exists returned {n} for {len(keys)} keys")
            return Outcome(0, answered=False)
        return Outcome(n)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra: Any = None) -> Outcome:
        return self._pages("get", self.backend.batch_get_v1, keys, host_indices, extra)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra: Any = None) -> Outcome:
        return self._pages("set", self.backend.batch_set_v1, keys, host_indices, extra)

    def _pages(self, op: str, fn: Callable, keys: list[str], host_indices: torch.Tensor, extra: Any) -> Outcome:
        ok, result, abandoned = self._call(op, fn, keys, host_indices, *_opt(extra))
        if not ok:
            return Outcome(0, abandoned, answered=False)
        flags = page_flags(result, len(keys))
        if flags is None:
            self._fail(
                f"{op}_invalid_result",
                f"batch_{op}_v1 returned {_show(result)} for {len(keys)} keys; "
                f"the contract is a list of {len(keys)} bools",
            )
            return Outcome(0, answered=False)
        n = 0
        for f in flags:
            if not f:
                break
            n += 1
        return Outcome(n)

    def call_bounded(self, what: str, fn: Callable, *args: Any, force: bool = False) -> Any:
        """A housekeeping call (clear, close, stats) under the deadline; None if it failed or was abandoned."""
        ok, result, _ = self._call(what, fn, *args, force=force)
        return result if ok else None

    # --- lifecycle ---------------------------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Shutting down: calls waiting for a backend stop waiting (abandoned), new calls fail at once."""
        self._closing.set()

    def close(self) -> None:
        """Close the backend within the deadline (a close that hangs is abandoned), then stop the threads."""
        self._closing.clear()
        self.call_bounded("close", self.backend.close, force=True)
        self._closing.set()
        self._threads.stop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


def _opt(extra: Any) -> tuple:
    return () if extra is None else (extra,)


def page_flags(result: Any, n: int) -> Optional[list[bool]]:
    """The per-page flags of a v1 result, or None unless it is a list/tuple of exactly ``n`` booleans (bool,
    numpy bool, or the ints 0 and 1)."""
    if not isinstance(result, (list, tuple)) or len(result) != n:
        return None
    out = []
    for r in result:
        if isinstance(r, bool):
            out.append(r)
        elif (getattr(getattr(r, "dtype", None), "kind", None) == "b" and getattr(r, "ndim", 1) == 0) or (
            isinstance(r, int) and r in (0, 1)
        ):  # numpy bool scalars, 0 and 1
            out.append(bool(r))
        else:
            return None
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
