"""The scheduler thread: continuous batching over the reference engine, fed by the HTTP handlers.

One thread owns the engine and its cache (as SGLang's scheduler process does). Handlers hand it requests, aborts
and control calls through a queue; it runs ``engine.step()`` while there is work, and reports each new token and
each finish back to the handler's event loop (``loop.call_soon_threadsafe``). Control calls (flush the cache,
attach or detach a storage backend) run between steps; those that need an idle engine say so and fail otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Optional

import attrs

from hicache_core.engine import Engine, Request

logger = logging.getLogger(__name__)


class Busy(RuntimeError):
    """A control call that needs an idle engine found requests running or waiting."""


class Stream:
    """A request's events for its handler: ("token", request) after each token, ("done", request) at the end."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Request]] = asyncio.Queue()

    def push(self, kind: str) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, self.request))
        except RuntimeError:  # the loop is closed: the server is stopping
            pass


class Scheduler:
    def __init__(self, engine: Engine, on_finish: Optional[Callable[[Request], None]] = None, tp: Any = None) -> None:
        self.engine = engine
        self.on_finish = on_finish
        self.tp = tp  # rank 0 of a tensor-parallel server: every iteration's inputs go to the other ranks first
        self.target: Any = None  # what control calls run on (the server state)
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hicache-scheduler", daemon=True)
        self.steps = 0
        self.last_error: Optional[str] = None

    # --- from the handlers (any thread) ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Stream:
        stream = Stream(request, loop)
        user_hook = request.on_token

        def on_token(r: Request) -> Optional[bool]:
            stop = user_hook(r) if user_hook else None
            stream.push("token")
            return stop

        request.on_token = on_token
        request.arrival = time.perf_counter()
        self._inbox.put(("add", stream))
        return stream

    def abort(self, request: Request) -> None:
        self._inbox.put(("abort", request))

    def call(self, name: str, *args: Any, idle: bool = False) -> Future:
        """Run ``target.<name>(*args)`` on the scheduler thread between steps (on every rank); with ``idle``, only
        when no request runs or waits (else the future fails with :class:`Busy`)."""
        fut: Future = Future()
        self._inbox.put(("call", (name, args, idle, fut)))
        return fut

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests; read without a lock (a gauge)."""
        return len(self.engine.running), len(self.engine.waiting)

    # --- the thread ---------------------------------------------------------------------------------------------------
    def _take(self, block: bool) -> list[tuple[str, Any]]:
        items = []
        cache = self.engine.cache
        # idle with copies or backups in flight: poll often, so each next one starts soon (a PD decode's offload
        # should be in storage before the next turn reaches prefill)
        # (a restore's prefetch too: the next turn may be on its way)
        busy = cache.ongoing_write_through or cache.ongoing_backup or getattr(cache, "ongoing_prefetch", None)
        wait = 0.002 if busy else 0.05
        try:
            items.append(self._inbox.get(timeout=wait) if block else self._inbox.get_nowait())
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            return items

    def _send(self, items: list[tuple[str, Any]], stop: bool) -> None:
        """Tensor parallel: this iteration's inputs to the other ranks (serve/tp.py follows them)."""
        plan: list[tuple] = []
        for kind, arg in items:
            if kind == "add":
                r = arg.request
                plan.append(("add", r.rid, r.prompt, attrs.asdict(r.params)))
            elif kind == "abort":
                plan.append(("abort", arg.rid))
            elif kind == "call":
                plan.append(("call", arg[0], arg[1], arg[2]))
        self.tp.send_plan(plan, stop)

    def _handle(self, kind: str, arg: Any) -> None:
        eng = self.engine
        if kind == "add":
            self._streams[arg.request.rid] = arg
            eng.submit(arg.request)
        elif kind == "abort":
            if eng.abort(arg):
                self._done(arg)
        elif kind == "call":  # runs even when its caller has gone: the other ranks run it too
            name, args, idle, fut = arg
            live = fut.set_running_or_notify_cancel()
            if idle and eng.busy():
                running, waiting = self.counts()
                if live:
                    fut.set_exception(Busy(f"{running} requests running and {waiting} waiting; retry when idle"))
                return
            try:
                result = getattr(self.target, name)(*args)
            except BaseException as e:  # the caller sees it
                if live:
                    fut.set_exception(e)
                return
            if live:
                fut.set_result(result)

    def _done(self, r: Request) -> None:
        stream = self._streams.pop(r.rid, None)
        if self.on_finish is not None:
            try:
                self.on_finish(r)
            except Exception:
                logger.exception("scheduler: finish hook failed")
        if stream is not None:
            stream.push("done")

    def _run(self) -> None:
        eng = self.engine
        while True:
            items = self._take(block=not eng.busy())
            stop = self._stop.is_set()
            if self.tp is not None:
                self._send(items, stop)
            for item in items:
                self._handle(*item)
            if stop:
                break
            if not eng.busy():
                eng.idle()  # backups finish while idle too
                continue
            try:
                finished, worked = eng.step()
            except Exception as e:  # a bug must not leave every client hanging: fail what is in flight
                logger.exception("scheduler: step failed; aborting the requests in flight")
                self.last_error = f"{type(e).__name__}: {e}"
                for r in eng.in_flight():
                    try:
                        eng.abort(r)
                    except Exception:
                        logger.exception("scheduler: abort after a failed step failed")
                        eng.forget(r)
                    r.finish_reason = "error"
                    self._done(r)
                continue
            self.steps += 1
            for r in finished:
                self._done(r)
            if not worked:
                time.sleep(0.0005)  # requests wait on their storage prefetch
        for r in eng.in_flight():  # stopping: nobody waits forever
            eng.abort(r)
            self._done(r)
