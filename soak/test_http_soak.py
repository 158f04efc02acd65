"""Soak over HTTP: a real `hicache serve` on a store that fails every way the certify kit knows (soak/faulty_store.py,
loaded by ``dynamic``), many tenants at once, each generating (some with retention hints), restoring, listing and
closing its sessions, while tiny pools churn. Every answer's tokens must equal what recomputing gives (the same
prompt under a fresh salt: nothing cached can touch it); at the end, with sessions closed and the cache flushed,
no page is in use on device or host, and the server's resident memory stayed flat.

``HICACHE_HTTP_SOAK_SECONDS`` sets the load's length (default 45; ``tox -e soak -- -k http`` with it set to 1800
for a long run). The figures print with ``-s`` (the soak env runs so).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from hicache_core.testing.server import TINY_MODEL, serve

SECONDS = float(os.environ.get("HICACHE_HTTP_SOAK_SECONDS", "45"))
TENANTS = [f"tenant-{i}" for i in range(8)]
CLIENTS = 12
ADMIN, API = "soak-admin", "soak-user"
HERE = Path(__file__).resolve().parent
PS = 16


def prompts_of(tenant_index: int) -> list[str]:
    """A tenant's conversations: three system prompts, each with turns that grow on it (shared prefixes)."""
    out = []
    for family in range(3):
        rules = (f"[{tenant_index}.{family}] rule {i}: answer briefly and cite the tool's output. " for i in range(3))
        system = "".join(rules)
        for turn in range(4):
            out.append(system + "".join(f"user {t}: next step of the plan, please. " for t in range(turn + 1)))
    return out


class Soak:
    def __init__(self, server) -> None:
        self.s = server
        self.reference: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.wrong: list[str] = []

    def post(self, path, body, **kw):
        return self.s.call("POST", path, body, key=API, **kw)

    def expected(self, text: str) -> list[int]:
        with self.lock:
            if text in self.reference:
                return self.reference[text]
        # a salt nobody else uses: no tier holds a page of it, so this is a recompute
        status, out, _ = self.post("/generate", self.body(text, f"ref-{uuid.uuid4().hex}"))
        assert status == 200, out
        with self.lock:
            return self.reference.setdefault(text, out["output_ids"])

    @staticmethod
    def body(text: str, salt: str, **kw):
        return {"text": text, "sampling_params": {"max_new_tokens": 4}, "cache_salt": salt, **kw}

    def client(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < until:
            t = rng.randrange(len(TENANTS))
            salt, text = TENANTS[t], rng.choice(prompts_of(t))
            op = rng.random()
            if op < 0.65:
                extra = {}
                if rng.random() < 0.3:
                    extra = {"retention_seconds": rng.choice([5, 30, 10**6]), "session_id": f"s{rng.randrange(4)}"}
                status, out, _ = self.post("/generate", self.body(text, salt, **extra))
                if status == 429:
                    self.count("429")
                    continue
                assert status == 200, out
                self.count("generate")
                self.count(f"cached_{'hit' if out['meta_info']['cached_tokens'] else 'miss'}")
                if extra:
                    self.count(f"retention_{out['meta_info']['retention']['status']}")
                if out["output_ids"] != self.expected(text):
                    with self.lock:
                        self.wrong.append(f"{salt}: {text[:60]!r}: {out['output_ids']} != {self.expected(text)}")
            elif op < 0.8:
                status, out, _ = self.post("/hicache/prefetch", {"text": text, "cache_salt": salt, "ttl_seconds": 5})
                assert status in (200, 429), out
                self.count("restore_429" if status == 429 else f"restore_{out['state']}")
            elif op < 0.9:
                hdr = {"X-Hicache-Cache-Salt": salt}
                status, out, _ = self.s.call("DELETE", f"/hicache/sessions/s{rng.randrange(4)}", key=API, headers=hdr)
                assert status in (200, 404), out
                self.count(f"close_{status}")
            else:
                hdr = {"X-Hicache-Cache-Salt": salt}
                status, out, _ = self.s.call("GET", "/hicache/sessions", key=API, headers=hdr)
                assert status == 200 and all(r["tenant"] != "default" for r in out["retained"]), out
                self.count("sessions")

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1


def test_http_soak(tmp_path):
    extra = {
        "backend_name": "faulty_file",
        "module_path": "faulty_store",
        "class_name": "FaultyFileStore",
        "interface_v1": 1,
        "storage_dir": str(tmp_path / "store"),
        "capacity_bytes": 8 << 20,
        "fault_rate": 0.08,
        "fault_hang_s": 0.4,
        "io_timeout_s": 0.2,
        "prefetch_threshold": PS,
    }
    flags = [
        "--page-size",
        str(PS),
        "--max-total-tokens",
        "1024",
        "--max-running-requests",
        "8",
        *TINY_MODEL,
        "--enable-metrics",
        "--enable-hierarchical-cache",
        "--hicache-ratio",
        "2",
        "--hicache-storage-backend",
        "dynamic",
        "--hicache-storage-prefetch-policy",
        "wait_complete",
        "--hicache-storage-backend-extra-config",
        json.dumps(extra),
        "--hicache-retention-tenant-ratio",
        "0.2",
        "--tenant-max-requests",
        "3",
        "--tenant-max-restores",
        "2",
        "--api-key",
        API,
        "--admin-api-key",
        ADMIN,
    ]
    with serve(tmp_path, *flags, pythonpath=[HERE]) as s:
        soak = Soak(s)
        warm = time.monotonic() + min(10.0, SECONDS / 4)
        threads = [threading.Thread(target=soak.client, args=(i, warm)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss_warm = s.rss_mib()
        started, until = time.monotonic(), time.monotonic() + SECONDS
        threads = [threading.Thread(target=soak.client, args=(100 + i, until)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 120)
        assert not any(t.is_alive() for t in threads), "a client hung"
        elapsed = time.monotonic() - started
        rss_end = s.rss_mib()
        injected = {
            m: s.metric("hicache_storage_backend_stat", key=ADMIN, field=f"injected_{m}")
            for m in ("raise", "hang", "short_result", "long_result", "bad_exists", "corrupt")
        }
        corrupt = s.metric("hicache_storage_backend_stat", key=ADMIN, field="corrupt")
        # every session of every tenant closed, then the local tiers emptied: nothing may stay in use
        for t in TENANTS:
            for i in range(4):
                s.call("DELETE", f"/hicache/sessions/s{i}", key=API, headers={"X-Hicache-Cache-Salt": t})
        assert s.call("GET", "/hicache/sessions?all_tenants=true", key=ADMIN)[1]["retained"] == []
        # restores still fetching (TTL 5 s) and calls past their deadline (back within fault_hang_s) hold host
        # pages until they end; then every page must be free
        deadline = time.monotonic() + 30
        while True:
            status, out, _ = s.call("POST", "/flush_cache", key=ADMIN)  # only when idle
            device = s.metric("sglang:token_usage", key=ADMIN)
            host = s.metric("hicache:host_token_usage", key=ADMIN)
            if (status == 200 and device == 0 and host == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == 200, out
        print(
            f"\nhttp soak: {soak.counts['generate']} generations in {elapsed:.0f} s ({CLIENTS} clients, "
            f"{len(TENANTS)} tenants), {dict(sorted(soak.counts.items()))}; faults injected {injected}; "
            f"pages refused as corrupt {corrupt:.0f}; RSS {rss_warm:.0f} -> {rss_end:.0f} MiB; "
            f"in use after flush: device {device}, host {host}"
        )
        assert not soak.wrong, f"{len(soak.wrong)} wrong answers:\n" + "\n".join(soak.wrong[:10])
        assert soak.counts["generate"] >= 100 and soak.counts["cached_hit"] > 0, soak.counts
        assert sum(v or 0 for v in injected.values()) > 0, "no fault was injected: the soak proved nothing"
        assert device == 0 and host == 0, f"pages leaked: device {device}, host {host}"
        assert rss_end - rss_warm < max(48.0, 0.15 * rss_warm), f"RSS grew {rss_warm:.0f} -> {rss_end:.0f} MiB"
    assert "Traceback" not in s.log.read_text(), s.log.read_text()[-4000:]
