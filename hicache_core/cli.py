"""``hicache``: list backends, check a configuration end to end, run benchmarks.

Every error a user can cause ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Optional

import torch

from hicache_core import __version__
from hicache_core.config import HiCacheConfig, add_hicache_args
from hicache_core.errors import HiCacheError
from hicache_core.memory import DTYPES
from hicache_core.parse import arg_int

logger = logging.getLogger("hicache")


def add_model_args(parser: argparse.ArgumentParser, *, layers: int = 4, heads: int = 8, head_dim: int = 128) -> None:
    g = parser.add_argument_group("KV shape")
    g.add_argument("--num-layers", type=arg_int(1, 4096), default=layers, help=f"layers (default {layers})")
    g.add_argument("--num-kv-heads", type=arg_int(1, 4096), default=heads, help=f"KV heads per rank (default {heads})")
    g.add_argument(
        "--head-dim",
        type=arg_int(1, 65536),
        default=head_dim,
        help=f"head dim; the latent width with --mla (default {head_dim})",
    )
    g.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="KV dtype (default bfloat16)")
    g.add_argument("--mla", action="store_true", help="MLA: one latent vector per token and layer")
    g.add_argument("--tp-rank", type=arg_int(0), default=0, help="this rank (part of the storage namespace; default 0)")
    g.add_argument(
        "--tp", "--tp-size", dest="tp_size", type=arg_int(1, 1024), default=1, help="tensor-parallel ranks (default 1)"
    )


def spec_from_args(args: argparse.Namespace):
    from hicache_core.memory import KVSpec

    return KVSpec(
        layer_num=args.num_layers,
        head_num=1 if args.mla else args.num_kv_heads,
        head_dim=args.head_dim,
        dtype=DTYPES[args.dtype],
        is_mla=args.mla,
    )


# --- hicache backends ---------------------------------------------------------------------------------------------
def cmd_backends(args: argparse.Namespace) -> int:
    from hicache_core.plugins import get_plugin_manager
    from hicache_core.registry import resolve

    pm = get_plugin_manager()
    table, broken = pm.offered_backends()
    rows = []
    for name in sorted(table):
        offers = table[name]
        for offer in offers:
            status = "ok"
            if len(offers) > 1:
                status = "conflict: name claimed by " + ", ".join(o.distribution for o in offers)
            else:
                try:
                    resolve(name, {}, pm)
                except HiCacheError as e:
                    status = f"does not load: {e}"
            rows.append(
                {
                    "name": name,
                    "distribution": offer.distribution,
                    "version": offer.version,
                    "interface": "v1" if offer.record.interface_v1 else "v0",
                    "page_first_only": offer.record.page_first_only,
                    "status": status,
                    "description": offer.record.description,
                }
            )
    failures = [
        {"plugin": f.entry_point, "distribution": f.distribution, "error": f.error}
        for f in list(pm.failures.values()) + broken
    ]
    if args.json:
        print(json.dumps({"backends": rows, "failed_plugins": failures}, indent=2))
        return 0
    print(f"{'NAME':<10} {'DISTRIBUTION':<24} {'VERSION':<9} {'IO':<3} STATUS / DESCRIPTION")
    for r in rows:
        dist = r["distribution"]
        detail = r["description"] if r["status"] == "ok" else r["status"]
        print(f"{r['name']:<10} {dist:<24} {r['version']:<9} {r['interface']:<3} {detail}")
    print(
        f"{'dynamic':<10} {'(any module)':<24} {'':<9} {'v0/1':<3} "
        "load a class by module_path/class_name (extra config JSON)"
    )
    for f in failures:
        print(f"plugin {f['plugin']} ({f['distribution']}) failed to load: {f['error']}")
    return 0


# --- hicache check ------------------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from hicache_core.keys import hash_chain
    from hicache_core.metrics import CacheMetrics
    from hicache_core.registry import open_backend, resolve_config
    from hicache_core.storage.guard import GuardedStorage

    config, resolved = resolve_config(HiCacheConfig.from_args(args))
    spec = spec_from_args(args)
    print(
        f"config ok: page_size={config.page_size} layout={config.hicache_mem_layout} io={config.hicache_io_backend} "
        f"write={config.hicache_write_policy} prefetch={config.hicache_storage_prefetch_policy} "
        f"(threshold {config.prefetch_threshold} tokens)"
    )
    if resolved is None:
        print("no storage backend configured (--hicache-storage-backend): nothing more to check")
        return 0
    n, ps = args.pages, config.page_size
    # a namespace of its own: the round trip never meets real pages, and clear() removes exactly its own
    config = config.replace(model_name=f"hicache-check-{uuid.uuid4().hex[:12]}")
    backend, pool = open_backend(
        config, spec, 2 * n * ps, resolved=resolved, tp_rank=args.tp_rank, tp_size=args.tp_size
    )
    guard = None
    try:
        print(f"backend {backend.name} ({'v1' if backend.interface_v1 else 'v0 via adapter'}) at {backend.describe()}")
        src = pool.alloc(n * ps)
        dst = pool.alloc(n * ps)
        assert src is not None and dst is not None  # the pool holds exactly these
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        pool.raw.copy_(torch.randint(0, 256, pool.raw.shape, dtype=torch.uint8, generator=g))
        tokens = torch.randint(0, 2**31, (n * ps,), generator=g).tolist()
        keys = hash_chain(tokens, ps)
        # through the guard the controller uses: a hung or lying backend is a failed check, bounded by io_timeout_s
        guard = GuardedStorage(backend, CacheMetrics(), timeout_s=config.io_timeout_s, max_abandoned=3)
        failures: list[str] = []

        def step(fn, *a) -> int:
            guard.last_failure = None
            n_ok = fn(*a).ok
            if guard.last_failure and guard.last_failure not in failures:
                failures.append(guard.last_failure)
            return n_ok

        t0 = time.perf_counter()
        wrote = step(guard.batch_set_v1, keys, src)
        t1 = time.perf_counter()
        found = step(guard.batch_exists, keys)
        t2 = time.perf_counter()
        got = step(guard.batch_get_v1, keys, dst)
        t3 = time.perf_counter()
        for f in failures:
            print(f"  the backend failed: {f}")
        same = got == n and all(
            torch.equal(
                pool.get_flat_page(int(src[i * ps])).view(torch.uint8),
                pool.get_flat_page(int(dst[i * ps])).view(torch.uint8),
            )
            for i in range(n)
        )
        mib = n * pool.page_bytes / 2**20
        print(f"  namespace {config.model_name} ({backend.namespace_tag})")
        print(f"  set    {wrote}/{n} pages  {mib / max(t1 - t0, 1e-9):8.1f} MiB/s")
        print(f"  exists {found}/{n} pages")
        print(
            f"  get    {got}/{n} pages  {mib / max(t3 - t2, 1e-9):8.1f} MiB/s  "
            f"bytes {'identical' if same else 'DIFFER'}"
        )
        ok = wrote == n and found == n and got == n and same
        guard.last_failure = None
        guard.call_bounded("clear", backend.clear)
        if guard.last_failure:
            print(f"  cleanup: {guard.last_failure}; the check pages may remain")
        else:
            left = guard.batch_exists(keys).ok
            print(
                f"  cleanup: {'removed the check pages' if left == 0 else f'{left} check pages could not be removed'}"
            )
        print("check passed" if ok else "check FAILED")
        return 0 if ok else 1
    finally:
        guard.close() if guard is not None else backend.close()


# --- entry point --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hicache", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (hicache-core)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="list every storage backend found, where it comes from and whether it loads")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("check", help="validate flags, build the backend and round-trip a few pages (then remove them)")
    add_hicache_args(p)
    add_model_args(p, layers=2, heads=2, head_dim=64)
    p.add_argument("--pages", type=arg_int(1, 1 << 16), default=4, help="pages to round-trip (default 4)")
    p.set_defaults(func=cmd_check)

    from hicache_core.certify import add_arguments as add_certify_arguments
    from hicache_core.certify import certify_main

    p = sub.add_parser(
        "certify",
        help="the conformance kit plus faults injected through the real controller: a "
        "pass/fail table for a storage backend",
    )
    add_hicache_args(p)
    add_certify_arguments(p)
    p.set_defaults(func=certify_main, page_size=16)

    from hicache_core.serve import add_arguments as add_serve_arguments
    from hicache_core.serve import run as serve_main

    p = sub.add_parser("serve", help="serve the reference engine over SGLang's and OpenAI's HTTP APIs")
    add_serve_arguments(p)
    p.set_defaults(func=serve_main)

    from hicache_core.bench import BENCHMARKS

    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS))
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name, (add_arguments, run, helptext) in BENCHMARKS.items():
        bp = bsub.add_parser(name, help=helptext)
        add_arguments(bp)
        bp.set_defaults(func=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "tp_size", None) is not None and getattr(args, "tp_rank", 0) >= args.tp_size:
        parser.error(f"--tp-rank {args.tp_rank} must be below --tp-size {args.tp_size} (ranks count from 0)")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except HiCacheError as e:
        print(f"hicache: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hicache: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(
            "hicache: error: not enough memory for the pools these flags ask for; lower the sizes "
            "(--pages, --page-size, --device-tokens, --hicache-ratio ...)",
            file=sys.stderr,
        )
        return 2
    except RuntimeError as e:
        if "alloc" not in str(e).lower():
            return _internal_error(e, args)
        print(
            f"hicache: error: not enough memory for the pools these flags ask for ({str(e).splitlines()[0]}); "
            "lower the sizes (--pages, --page-size, --device-tokens, --hicache-ratio ...)",
            file=sys.stderr,
        )
        return 2
    except Exception as e:
        return _internal_error(e, args)


def _internal_error(e: BaseException, args: argparse.Namespace) -> int:
    """A failure nobody anticipated: one line (the traceback with -v), and a request to report it."""
    if args.verbose:
        logger.exception("unexpected failure")
    print(
        f"hicache: internal error: {type(e).__name__}: {e}; rerun with -v for the traceback and please report it",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
