"""``hicache serve --tp-size N``: one process per rank; rank 0 serves HTTP, the others follow its scheduler.

Rank 0 runs the HTTP server and the scheduler thread. Every scheduler iteration first broadcasts its inputs --
requests added (id, prompt, sampling parameters), aborted, control calls (flush, attach, detach), stop -- and
every other rank applies the same inputs to its own engine and runs the same step, so the ranks' forward passes
meet in their all-reduces and their caches agree (``cache/agree.py``). Collectives come from rank 0's scheduler
thread and the other ranks' main threads only.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
from typing import Any

from hicache_core.config import HiCacheConfig
from hicache_core.serve.protocol import Params

logger = logging.getLogger(__name__)


def follow(state: Any, ctx: Any) -> None:
    """A rank other than 0: apply rank 0's inputs, step when it steps, until it stops."""
    eng = state.engine
    requests: dict[str, Any] = {}
    while True:
        plan, stop = ctx.recv_plan()
        for item in plan:
            if item[0] == "add":
                _, rid, prompt, params = item
                r = state.new_request(prompt, Params(**params), rid=rid)
                requests[rid] = r
                eng.submit(r)
            elif item[0] == "abort":
                r = requests.pop(item[1], None)
                if r is not None:
                    eng.abort(r)
            elif item[0] == "call":
                _, name, args, idle = item
                if idle and eng.busy():
                    continue
                try:
                    getattr(state, name)(*args)
                except Exception as e:  # rank 0 failed the same way and told its client
                    logger.warning("rank %d: %s failed: %s", ctx.rank, name, e)
        if stop:
            break
        if not eng.busy():
            eng.idle()
            continue
        finished, _ = eng.step()
        for r in finished:
            requests.pop(r.rid, None)
    for r in eng.in_flight():
        eng.abort(r)
    eng.close()


def _rank_main(ctx: Any, args: argparse.Namespace, config: HiCacheConfig) -> None:
    from hicache_core.serve.state import ServerState

    state = ServerState(args, config, tp=ctx)
    if ctx.rank != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when everyone stops
        follow(state, ctx)
        return
    from hicache_core.serve import serve_state

    serve_state(args, state)


def serve_tp(args: argparse.Namespace, config: HiCacheConfig) -> int:
    """Start the ranks and wait; SIGTERM / SIGINT stop rank 0's server, which stops the others."""
    import torch.multiprocessing as mp

    from hicache_core.engine.tp import rank_entry

    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})
    with tempfile.TemporaryDirectory(prefix="hicache-serve-tp-") as d:
        procs = mp.start_processes(
            rank_entry,
            args=(args.tp_size, d, _rank_main, (plain, config)),
            nprocs=args.tp_size,
            join=False,
            start_method="spawn",
        )

        def stop(signum: int, _frame: Any) -> None:
            os.kill(procs.processes[0].pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            while not procs.join():
                pass
        except mp.ProcessRaisedException as e:
            last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            print(f"hicache: error: a serving rank failed: {last}", flush=True)
            return 1
    return 0
