"""``hicache certify``: what a storage vendor runs before publishing a plugin.

Two parts, one pass/fail table:

1. **Conformance**: the kit (:mod:`hicache_core.testing`) run by pytest against the configured backend; ``{tmp}``
   in the extra config becomes a fresh directory per test (and one temporary directory for part 2).
2. **Faults through the real controller**: requests through a real cache with tiny pools (every served byte checked
   against what computing it gives, :mod:`hicache_core.faults`), while the backend is made to raise, hang
   past the deadline, return wrong shapes, answer ``batch_exists`` with junk, have stored pages damaged, or be
   restarted under the running cache. Each row: a writer cache fills the store, a second cache (another server, or
   the same one restarted) reads it back while the writer is still open. A row passes when no wrong KV was
   served, no page leaked and no request waited past the bound.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import tempfile
import textwrap
import time
import uuid
from typing import Any

import attrs
import torch

from hicache_core.config import HiCacheConfig
from hicache_core.errors import ConfigError
from hicache_core.faults import FAULTS, FaultyBackend, RunResult, drain, make_prompts, run_requests, small_cache
from hicache_core.memory import KVSpec
from hicache_core.registry import create_backend, make_storage_config, resolve_config
from hicache_core.storage.hooks import CorruptsStoredPages

SPEC = KVSpec(layer_num=2, head_num=2, head_dim=16, dtype=torch.float32)
DEADLINE_S = 0.5
HANG_S = 1.5


@attrs.define
class Row:
    part: str
    name: str
    outcome: str  # passed, FAILED, n/a
    detail: str = ""


# --- part 1: the conformance kit --------------------------------------------------------------------------------------
KIT = textwrap.dedent("""
    import json, os
    from hicache_core.registry import resolve
    from hicache_core.testing import BackendConformance

    class TestCertified(BackendConformance):
        backend_name = os.environ["HICACHE_CERTIFY_BACKEND"]
        # a backend class says supports_v0 = False when it moves pages only in place (v1)
        supports_v0 = getattr(resolve(backend_name, json.loads(os.environ["HICACHE_CERTIFY_EXTRA"])).cls,
                              "supports_v0", True)

        def extra_config(self, tmp_path):
            return json.loads(os.environ["HICACHE_CERTIFY_EXTRA"].replace("{tmp}", str(tmp_path)))

        # namespaces of this run only: a shared store keeps what others wrote (and its own sizes)
        def config(self, layout, **changes):
            cfg = super().config(layout, **changes)
            return cfg.replace(model_name=f"{cfg.model_name}-{os.environ['HICACHE_CERTIFY_RUN']}")

        def build(self, tmp_path, layout, *, model="conformance", **kw):
            return super().build(tmp_path, layout, model=f"{model}-{os.environ['HICACHE_CERTIFY_RUN']}", **kw)
""")


class _Collect:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def pytest_runtest_logreport(self, report) -> None:
        name = report.nodeid.split("::")[-1]
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.skipped:
                reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                self.rows.append(Row("conformance", name, "n/a", reason.replace("Skipped: ", "")))
            elif report.failed:
                text = str(report.longrepr).strip().splitlines()
                why = [t[1:].strip() for t in text if t.startswith("E ")][:1]  # the assertion's own message
                where = text[-1] if text else ""
                self.rows.append(Row("conformance", name, "FAILED", "; ".join(why + [where])[:400]))
            else:
                self.rows.append(Row("conformance", name, "passed"))


def run_conformance(backend: str, extra: dict[str, Any]) -> list[Row]:
    try:
        import pytest
    except ImportError as e:
        raise ConfigError(
            "hicache certify runs the conformance kit with pytest: pip install 'hicache-core[test]' "
            "(or --no-conformance to run only the fault part)"
        ) from e
    collect = _Collect()
    with tempfile.TemporaryDirectory(prefix="hicache-certify-") as d:
        path = os.path.join(d, f"test_certified_{uuid.uuid4().hex[:12]}.py")  # a module never imported before
        with open(path, "w") as f:
            f.write(KIT)
        env = {
            "HICACHE_CERTIFY_BACKEND": backend,
            "HICACHE_CERTIFY_EXTRA": json.dumps(extra),
            "HICACHE_CERTIFY_RUN": uuid.uuid4().hex[:8],
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                pytest.main(
                    [
                        "-p",
                        "no:cacheprovider",
                        "-p",
                        "no:terminal",
                        "--rootdir",
                        d,
                        "--basetemp",
                        os.path.join(d, "tmp"),
                        path,
                    ],
                    plugins=[collect],
                )
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if not collect.rows:
        return [Row("conformance", "collection", "FAILED", "the kit did not run (see pytest's errors with -v)")]
    return collect.rows


# --- part 2: faults through the controller ----------------------------------------------------------------------------
RATES = {
    "none": 0.0,
    "raise": 0.3,
    "hang": 0.15,
    "bool_result": 0.3,
    "short_result": 0.3,
    "long_result": 0.3,
    "bad_exists": 0.3,
    "corrupt": 0.3,
    "restart": 0.0,
}
WHAT = {
    "none": "no fault: the store must serve what it was given",
    "raise": "calls raise",
    "hang": f"calls take {HANG_S:g} s against a {DEADLINE_S:g} s deadline",
    "bool_result": "v1 calls return a bool, not a list",
    "short_result": "v1 calls return too few results",
    "long_result": "v1 calls return too many results",
    "bad_exists": "batch_exists returns junk (bool, str, negative, too big)",
    "corrupt": "stored pages damaged after they are written",
    "restart": "the backend is closed and rebuilt under the running cache",
}


NO_FAULT, NO_FAULT_REDRAWS = "no fault was injected", 2


def _fault_row(mode: str, config: HiCacheConfig, requests: int, seed: int) -> Row:
    rng = random.Random(seed)
    ps = config.page_size
    extra = {**config.hicache_storage_backend_extra_config, "io_timeout_s": DEADLINE_S, "prefetch_threshold": ps}
    cfg = config.replace(
        model_name=f"hicache-certify-{mode}-{uuid.uuid4().hex[:8]}",
        hicache_storage_prefetch_policy="wait_complete",
        hicache_write_policy="write_through",
        hicache_storage_backend_extra_config=extra,
    )
    prompts = make_prompts(rng, families=4, pages=6, page_size=ps)
    writer, reader, injected = RunResult(), RunResult(), 0
    t0 = time.monotonic()
    caches: list[tuple[Any, RunResult]] = []
    try:
        # the writer stays open while a second cache reads: some stores keep pages only while their writer lives
        for result in (writer, reader):
            cache = small_cache(cfg, SPEC)
            caches.append((cache, result))
            if mode == "corrupt" and not isinstance(cache.storage.raw, CorruptsStoredPages):
                return Row(
                    "faults",
                    mode,
                    "n/a",
                    "the backend offers no corrupt_stored_page(key) to damage a stored "
                    "page with (see docs/writing-a-backend.md)",
                )
            faulty = cache.operator.wrap_storage(
                lambda handle: FaultyBackend(handle, mode, RATES[mode], rng, hang_s=HANG_S)
            )

            def between(i: int, cache=cache, faulty=faulty) -> None:
                if mode == "restart" and i == requests // 2:
                    cache.flush(30)
                    old = faulty.inner
                    faulty.inner = create_backend(
                        cfg.hicache_storage_backend or "",
                        make_storage_config(cfg, SPEC),
                        cache.host_pool,
                        extra_config=cfg.backend_extra_config,
                    )
                    old.close()
                    faulty.injected += 1

            run_requests(cache, prompts, requests, rng, result, between, wait_limit_s=DEADLINE_S * 8 + 10)
            cache.flush(30)  # every backup landed (or failed) before the next cache reads
            injected += faulty.injected
    finally:
        for cache, result in reversed(caches):
            drain(cache, result)
    wrong, leaked = writer.wrong_kv + reader.wrong_kv, writer.leaked_pages + reader.leaked_pages
    wait = max(writer.longest_wait_s, reader.longest_wait_s)
    detail = (
        f"{writer.requests + reader.requests} requests, {injected} faults, {reader.storage_tokens} tokens from "
        f"storage in the second cache, wrong KV {wrong}, leaked pages {leaked}, longest wait {wait:.2f} s, "
        f"{time.monotonic() - t0:.1f} s"
    )
    problems = []
    if wrong:
        problems.append("served wrong KV")
    if leaked:
        problems.append("leaked pages")
    if mode == "none" and reader.storage_tokens == 0:
        problems.append("a second cache got no storage hits from a healthy backend")
    if mode != "none" and RATES[mode] and injected == 0:
        problems.append(NO_FAULT)
    return Row(
        "faults", mode, "FAILED" if problems else "passed", ("; ".join(problems) + " -- " if problems else "") + detail
    )


def run_faults(
    config: HiCacheConfig, requests: int, seed: int, modes: tuple[str, ...] = ("none", *FAULTS)
) -> list[Row]:
    rows = []
    for i, m in enumerate(modes):
        row = _fault_row(m, config, requests, seed + i)
        for k in range(1, NO_FAULT_REDRAWS + 1):
            if not (row.outcome == "FAILED" and row.detail.startswith(f"{NO_FAULT} -- ")):
                break
            # a row that drew no fault proves nothing: on a loaded machine copies land later and backups come in
            # fewer, larger calls, so a 0.3 rate can miss them all (the CI run of 2026-12-05 saw it once)
            row = _fault_row(m, config, requests, seed + i + 1000 * k)
        rows.append(row)
    return rows


# --- the command ------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=60, help="requests per cache in each fault row (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-conformance", action="store_true", help="skip the conformance kit (no pytest needed)")
    p.add_argument(
        "--faults", default=",".join(("none", *FAULTS)), help="fault rows to run, comma separated (default: all)"
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def cmd_certify(args: argparse.Namespace, config: HiCacheConfig) -> int:
    config, resolved = resolve_config(config)
    if resolved is None:
        raise ConfigError("--hicache-storage-backend: name the backend to certify (see `hicache backends`)")
    modes = tuple(m.strip() for m in args.faults.split(",") if m.strip())
    unknown = [m for m in modes if m not in RATES]
    if unknown:
        raise ConfigError(f"--faults: unknown {', '.join(unknown)}; choose from {', '.join(RATES)}")
    rows: list[Row] = []
    if not args.no_conformance:
        rows += run_conformance(config.hicache_storage_backend or "", config.backend_extra_config)
    with tempfile.TemporaryDirectory(prefix="hicache-certify-faults-") as d:  # what {tmp} means for the fault rows
        extra = json.loads(json.dumps(config.hicache_storage_backend_extra_config).replace("{tmp}", d))
        rows += run_faults(config.replace(hicache_storage_backend_extra_config=extra), args.requests, args.seed, modes)
    failed = [r for r in rows if r.outcome == "FAILED"]
    if args.json:
        print(
            json.dumps(
                {
                    "backend": config.hicache_storage_backend,
                    "passed": not failed,
                    "rows": [attrs.asdict(r) for r in rows],
                },
                indent=1,
            )
        )
    else:
        print(f"hicache certify: backend {config.hicache_storage_backend} ({resolved.origin})")
        width = max(len(r.name) for r in rows)
        for r in rows:
            print(f"  {r.part:<11} {r.name:<{width}}  {r.outcome:<6}  {r.detail}")
        counts = {o: sum(r.outcome == o for r in rows) for o in ("passed", "FAILED", "n/a")}
        print(
            f"{'CERTIFIED' if not failed else 'NOT CERTIFIED'}: {counts['passed']} passed, {counts['FAILED']} "
            f"failed, {counts['n/a']} not applicable"
        )
    return 1 if failed else 0


def certify_main(args: argparse.Namespace) -> int:
    log = logging.getLogger("hicache_core")
    level = log.level
    if not args.verbose:  # the faults are on purpose: their warnings would bury the table
        log.setLevel(logging.ERROR)
    try:
        return cmd_certify(args, HiCacheConfig.from_args(args))
    finally:
        log.setLevel(level)
