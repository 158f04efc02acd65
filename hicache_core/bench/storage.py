"""``hicache bench storage``: set / get / exists throughput of a storage backend through its v1 interface, beside the
plain baseline its plugin names (``backend.bench_baseline()``: raw file I/O, the raw Mooncake client, ...) and the
peer it is held to where one is importable (``backend.bench_peer()``: SGLang's HiCacheFile for the file backend),
on the same bytes in the same run, who goes first alternating by round."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from hicache_core.bench.common import dump_json, gbps, print_table
from hicache_core.bench.options import int_option
from hicache_core.config import HiCacheConfig, add_hicache_args
from hicache_core.errors import ConfigError
from hicache_core.keys import hash_chain
from hicache_core.memory import HostPool, KVSpec
from hicache_core.parse import arg_int
from hicache_core.registry import ResolvedBackend, open_backend, resolve_config
from hicache_core.storage.hooks import HasBenchBaseline, HasBenchPeer

BATCH = 128


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_hicache_args(p)
    p.set_defaults(hicache_storage_backend="file")
    p.add_argument("--page-kib", default="256,1024", help="page sizes in KiB (default 256,1024)")
    p.add_argument("--total-mib", type=arg_int(1, 1 << 20), default=256, help="MiB moved per measurement (default 256)")
    int_option(p, "--repeat", 1, 1000, 5, "rounds; the medians leave out the first, cold one")
    p.add_argument(
        "--via-sglang",
        action="store_true",
        help="measure the backend through HiCacheForSGLang (needs sglang) against the bare backend",
    )
    p.add_argument("--json", action="store_true")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _batches(keys, idx, ps):
    for i in range(0, len(keys), BATCH):
        yield keys[i : i + BATCH], idx[i * ps : (i + len(keys[i : i + BATCH])) * ps]


class _Bare:
    """The baseline of --via-sglang: the same backend called directly, same pool, same batches."""

    name = "the bare backend (same pool, same batches)"

    def __init__(self, backend, ps: int) -> None:
        self.backend, self.ps = backend, ps

    def set(self, keys, idx) -> None:
        _each(self.backend.batch_set_v1, keys, idx, self.ps, [])

    def get(self, keys, idx) -> None:
        _each(self.backend.batch_get_v1, keys, idx, self.ps, [])

    def cleanup(self) -> None:
        self.backend.clear()


def _measure(
    config: HiCacheConfig, resolved: ResolvedBackend, kib: int, total_mib: int, repeat: int, via_sglang: bool = False
) -> dict:
    ps = config.page_size
    item = 2 * 128 * 2  # 2 KV heads x head_dim 128 x bf16 per token and layer
    layers = kib * 1024 // (2 * ps * item)
    if layers < 1 or layers * 2 * ps * item != kib * 1024:
        raise ConfigError(f"--page-kib {kib} cannot be made of pages of {ps} tokens (2 heads x 128 dims, bf16)")
    spec = KVSpec(layer_num=layers, head_num=2, head_dim=128, dtype=torch.bfloat16)
    n = max(1, total_mib * 1024 // kib)
    config = config.replace(model_name="hicache-bench")
    backend, pool = open_backend(config, spec, 2 * n * ps, resolved=resolved)
    pool.raw.copy_(torch.randint(0, 256, pool.raw.shape, dtype=torch.uint8))
    src, dst = pool.alloc(n * ps), pool.alloc(n * ps)
    assert src is not None and dst is not None
    peer = None
    if via_sglang:
        from hicache_core.integrations.sglang import through_sglang

        baseline: Any = _Bare(backend, ps)
        backend = through_sglang(config, pool)  # measured: SGLang's view of the same backend
    else:
        baseline = backend.raw.bench_baseline() if isinstance(backend.raw, HasBenchBaseline) else None
        peer = backend.raw.bench_peer() if isinstance(backend.raw, HasBenchPeer) else None
    others = {k: b for k, b in (("base", baseline), ("peer", peer)) if b is not None}
    nbytes = n * pool.page_bytes
    res: dict[str, list[float]] = {
        k: [] for k in ("set", "get", "exists", "base_set", "base_get", "peer_set", "peer_get")
    }
    try:
        if peer is not None:
            peer.prepare(src)
        for rep in range(repeat):
            keys = hash_chain(torch.randint(0, 2**31, (n * ps,)).tolist(), ps, os.urandom(32).hex())
            if rep % 2 == 0:  # alternate who goes first: neither always gets a cold store
                _others_round(others, keys, src, dst, res)
            ok: list[bool] = []
            res["set"].append(_time(lambda: _each(backend.batch_set_v1, keys, src, ps, ok)))
            if not all(ok):
                raise RuntimeError(f"{sum(not x for x in ok)} of {n} pages failed to store")
            found: list[int] = []
            res["exists"].append(
                _time(lambda: found.extend(backend.batch_exists(k) for k, _ in _batches(keys, src, ps)))
            )
            got: list[bool] = []
            res["get"].append(_time(lambda: _each(backend.batch_get_v1, keys, dst, ps, got)))
            if not all(got):
                raise RuntimeError(f"{sum(not x for x in got)} of {n} pages failed to load")
            if not _same_pages(pool, src, dst):
                raise RuntimeError("pages read back differ from the pages written")
            if sum(found) != n:
                raise RuntimeError(f"exists found {sum(found)} of {n} pages")
            backend.clear()
            if rep % 2 == 1:
                _others_round(others, keys, src, dst, res)
    finally:
        backend.close()
        for b in others.values():
            b.cleanup()
            if hasattr(b, "close"):
                b.close()
        if isinstance(baseline, _Bare):
            baseline.backend.close()
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in res.items() if v}  # the cold round dropped
    row = {
        "page_kib": kib,
        "pages": n,
        "set_gbps": gbps(nbytes, med["set"]),
        "get_gbps": gbps(nbytes, med["get"]),
        "exists_kpages_s": n / med["exists"] / 1e3,
    }
    for k, b in others.items():
        row.update(
            {
                k if k == "peer" else "baseline": b.name,
                f"{k}_set_gbps": gbps(nbytes, med[f"{k}_set"]),
                f"{k}_get_gbps": gbps(nbytes, med[f"{k}_get"]),
                f"{k}_set_ratio": med[f"{k}_set"] / med["set"],
                f"{k}_get_ratio": med[f"{k}_get"] / med["get"],
            }
        )
    return row


def _each(fn, keys, idx, ps, out: list) -> None:
    """``fn`` over the batches, results appended to ``out``."""
    for k, i in _batches(keys, idx, ps):
        out.extend(fn(k, i))


def _others_round(others: dict, keys, src, dst, res) -> None:
    """One round of each baseline: set then get of the same pages, each timed, then its files removed."""
    for k, b in others.items():
        res[f"{k}_set"].append(_time(lambda: b.set(keys, src)))
        res[f"{k}_get"].append(_time(lambda: b.get(keys, dst)))
        if hasattr(b, "verify"):
            b.verify()
        b.cleanup()


def _same_pages(pool: HostPool, a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(
        all(x == y for x, y in zip(sa, sb)) for sa, sb in zip(pool.page_memoryviews(a), pool.page_memoryviews(b))
    )


def run(args: argparse.Namespace) -> int:
    config, resolved = resolve_config(HiCacheConfig.from_args(args))
    if resolved is None:
        raise ConfigError("--hicache-storage-backend: name the backend to measure (see `hicache backends`)")
    try:
        sizes = [int(k) for k in args.page_kib.split(",")]
    except ValueError:
        raise ConfigError(
            f"--page-kib {args.page_kib!r}: give page sizes in KiB, comma separated (e.g. 256,1024)"
        ) from None
    rows = [_measure(config, resolved, k, args.total_mib, args.repeat, args.via_sglang) for k in sizes]
    if args.json:
        dump_json({"backend": config.hicache_storage_backend, "layout": config.hicache_mem_layout, "results": rows})
        return 0
    print(
        f"hicache bench storage: backend {config.hicache_storage_backend}, layout {config.hicache_mem_layout}, "
        f"{args.total_mib} MiB per measurement, batches of {BATCH} pages, median of {args.repeat} rounds"
        + (" less the first (cold) one" if args.repeat > 1 else "")
    )
    print(f"baseline: {rows[0].get('baseline', 'none (the backend offers no bench_baseline)')}, same bytes, same run")
    if "peer" in rows[0]:
        print(f"peer: {rows[0]['peer']}, same bytes, same run")
    print()
    cols = [
        ("page_kib", "page KiB", "d"),
        ("pages", "pages", "d"),
        ("set_gbps", "set GB/s", ".2f"),
        ("base_set_gbps", "base set", ".2f"),
        ("base_set_ratio", "vs base", ".2f"),
    ]
    peer = [("peer_set_gbps", "peer set", ".2f"), ("peer_set_ratio", "vs peer", ".2f")] if "peer" in rows[0] else []
    cols += peer + [
        ("get_gbps", "get GB/s", ".2f"),
        ("base_get_gbps", "base get", ".2f"),
        ("base_get_ratio", "vs base", ".2f"),
    ]
    if peer:
        cols += [("peer_get_gbps", "peer get", ".2f"), ("peer_get_ratio", "vs peer", ".2f")]
    print_table(rows, cols + [("exists_kpages_s", "exists kpage/s", ".1f")])
    if "baseline" in rows[0] or peer:
        who = "the baseline's or the peer's" if peer else "the baseline's"
        print(f"\n(ratios: {who} time over ours; above 1 = we are faster)")
    return 0
