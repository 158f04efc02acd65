"""Crash consistency under load: SGLang's own ``bench_serving`` (``python -m sglang.benchmark.serving``, its
generated-shared-prefix workload, concurrency 32, with an API key) drives `hicache serve` writing through to a real
store while the server is ``kill -9``ed at random points ten times and restarted on the same store each time.
Clients beside it check every answer they get against recompute (the same prompt under a fresh salt). Then:

* file: every page file on disk opens (its envelope and checksum hold: no torn or half-written page is there to be
  served), no writer's temporary file is left, and the directory's usage counter equals the bytes on disk;
* hf3fs (real HTTP metadata server, which outlives the servers): every slot is a key's, reserved or free, none
  lost or doubled, and the dead servers' reservations came back when their leases ran out;
* mooncake: the *master* is killed and restarted ten times under load instead; the server keeps answering, right,
  and after the master is back its pages are written and read again.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest

from hicache_core.testing.checkpoint import make_checkpoint
from hicache_core.testing.server import serve

API, ADMIN = "bench-key", "operator-key"
KILLS = int(os.environ.get("HICACHE_CRASH_KILLS", "10"))
PS = 16
HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), hidden=64, heads=4)


def verify_prompts(vocab: int) -> list[list[int]]:
    """Conversations of token ids: four systems, each with turns growing on it (5-8 pages: storage-sized)."""
    rng = random.Random(7)
    out = []
    for _ in range(4):
        system = [rng.randrange(3, vocab) for _ in range(4 * PS)]
        for turn in range(1, 5):
            out.append(system + [rng.randrange(3, vocab) for _ in range(turn * PS)])
    return out


class Checker:
    """Clients beside the benchmark: each answer's tokens against recompute; connection failures (the server is
    down, or died while it sent an answer: an ``IncompleteRead``) are counted and retried, never judged."""

    def __init__(self, url: str, prompts: list[list[int]]) -> None:
        self.url, self.prompts = url, prompts
        self.reference: dict[int, list[int]] = {}
        self.counts: Counter = Counter()
        self.wrong: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def generate(self, ids: list[int], salt=None, timeout: float = 60.0):
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 6}}
        if salt:
            body["cache_salt"] = salt
        req = urllib.request.Request(
            self.url + "/generate",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API}"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def references(self) -> None:
        for i, ids in enumerate(self.prompts):  # a salt nobody uses: nothing cached can touch these
            self.reference[i] = self.generate(ids, salt=f"recompute-{uuid.uuid4().hex}")["output_ids"]

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            i = rng.randrange(len(self.prompts))
            try:
                out = self.generate(self.prompts[i])
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError):
                with self.lock:
                    self.counts["down"] += 1
                time.sleep(0.05)
                continue
            with self.lock:
                self.counts["answers"] += 1
                self.counts["storage_hit_tokens"] += out["meta_info"]["cached_tokens_details"].get("storage", 0)
                if out["output_ids"] != self.reference[i]:
                    self.wrong.append(f"prompt {i}: {out['output_ids']} != recompute {self.reference[i]}")

    def start(self, n: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.run, args=(s,), daemon=True) for s in range(n)]
        for t in threads:
            t.start()
        return threads


def bench(url: str, ckpt: Path, log: Path, prompts: int, rate: float) -> subprocess.Popen:
    """SGLang's bench_serving against ``url``: groups of prompts sharing a system prompt, 32 at a time at most."""
    argv = [
        sys.executable,
        "-m",
        "sglang.benchmark.serving",
        "--backend",
        "sglang",
        "--base-url",
        url,
        "--model",
        str(ckpt),
        "--tokenizer",
        str(ckpt),
        "--dataset-name",
        "generated-shared-prefix",
        "--gsp-num-groups",
        "8",
        "--gsp-prompts-per-group",
        str(max(1, prompts // 8)),
        "--gsp-system-prompt-len",
        "160",
        "--gsp-question-len",
        "24",
        "--gsp-output-len",
        "4",
        "--num-prompts",
        str(prompts),
        "--max-concurrency",
        "32",
        "--request-rate",
        str(rate),
        "--seed",
        "1",
        "--disable-tqdm",
    ]
    env = dict(os.environ, OPENAI_API_KEY=API, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def server_flags(ckpt: Path, port: int, backend: str, extra: dict) -> list[str]:
    return [
        "--model-path",
        str(ckpt),
        "--port",
        str(port),
        "--page-size",
        str(PS),
        "--max-total-tokens",
        "2048",
        "--max-running-requests",
        "32",
        "--enable-metrics",
        "--enable-cache-report",
        "--enable-hierarchical-cache",
        "--hicache-ratio",
        "2",
        "--hicache-write-policy",
        "write_through",
        "--hicache-storage-prefetch-policy",
        "wait_complete",
        "--hicache-storage-backend",
        backend,
        "--hicache-storage-backend-extra-config",
        json.dumps({"prefetch_threshold": PS, **extra}),
        "--api-key",
        API,
        "--admin-api-key",
        ADMIN,
    ]


def wait_done(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"bench_serving did not finish in {timeout:.0f} s:\n{log.read_text()[-3000:]}") from None
    text = log.read_text()
    assert proc.returncode == 0 and "Successful requests:" in text, text[-3000:]
    return text


def successful(text: str) -> int:
    line = next(x for x in text.splitlines() if x.startswith("Successful requests:"))
    return int(line.split()[-1])


class Run:
    """One crash run: a server, the checkers and bench_serving across ``KILLS`` kills of ``kill(run)`` at random
    points (it kills something and brings it back: the server, or the storage service under it)."""

    def __init__(self, tmp_path: Path, flags: list[str], ckpt: Path, url: str) -> None:
        self.tmp_path, self.flags, self.ckpt, self.url = tmp_path, flags, ckpt, url
        self.checker = Checker(url, verify_prompts(300))
        self.log = tmp_path / "bench.log"
        self.stack = ExitStack()
        self.server = self.start()
        self.at: list[float] = []
        self.bench_text = ""

    def start(self):
        return self.stack.enter_context(serve(self.tmp_path, *self.flags, check_alive=False))

    def restart_server(self) -> None:
        self.server.kill()  # kill -9: mid-write, mid-backup, mid-prefetch, wherever it was
        self.stack.close()
        self.stack = ExitStack()
        self.server = self.start()

    def __call__(self, kill, seed: int, prompts: int = 1440, rate: float = 24.0) -> Run:
        rng = random.Random(seed)
        self.checker.references()
        threads = self.checker.start(4)
        proc = bench(self.url, self.ckpt, self.log, prompts, rate)
        try:
            deadline = time.monotonic() + 120
            while "Starting main benchmark run" not in self.log.read_text():
                assert proc.poll() is None, self.log.read_text()[-3000:]
                assert time.monotonic() < deadline, "bench_serving never began its run"
                time.sleep(0.2)
            t0 = time.monotonic()
            span = prompts / rate  # the arrivals' length: every kill comes well before the last of them
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.3, 1.2))
                self.at.append(round(time.monotonic() - t0, 1))
                assert self.at[-1] < 0.8 * span, f"the kills outlasted the load (at {self.at} of {span:.0f} s)"
                kill(self)
            self.bench_text = wait_done(proc, self.log, 240)
            time.sleep(2)  # the checkers on the last server a while longer: what the kills left is read again
        finally:
            self.checker.stop.set()
            for t in threads:
                t.join(90)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return self

    def close(self) -> None:
        self.stack.close()

    def assert_right(self) -> None:
        c = self.checker
        assert not c.wrong, f"{len(c.wrong)} wrong answers:\n" + "\n".join(c.wrong[:8])
        assert c.counts["answers"] > 50, c.counts
        assert successful(self.bench_text) > 0, self.bench_text[-2000:]

    def settled_metric(self, field: str) -> float:
        """A backend stat once the server has been idle a moment (backups in flight landed)."""
        time.sleep(1.5)
        v = self.server.metric("hicache_storage_backend_stat", key=ADMIN, field=field)
        assert v is not None, f"no {field} in /metrics"
        return v


def file_audit(store: Path) -> tuple[int, list[str], int, int]:
    """Open every page file as a reader would (its envelope's lengths and checksum): (pages, bad ones, temporary
    files left, bytes of pages)."""
    from hicache_core.storage import HEADER_BYTES
    from hicache_core.storage.envelope import PageEnvelope

    pages, bad, tmps, total = 0, [], 0, 0
    for ns in [p for p in store.iterdir() if p.is_dir()]:
        env = PageEnvelope(ns.name)
        for path in ns.rglob("*"):
            if path.name.endswith(".tmp"):
                tmps += 1
            if not path.name.endswith(".page"):
                continue
            data = path.read_bytes()
            pages += 1
            total += len(data)
            payload = memoryview(data)[HEADER_BYTES:]
            try:
                key, header = path.name[: -len(".page")], memoryview(data)[:HEADER_BYTES]
                env.check(key, header, [payload], len(payload), len(data))
            except Exception as e:  # noqa: BLE001 (any refusal is a torn page)
                bad.append(f"{path.name}: {e}")
    return pages, bad, tmps, total


def test_file_store_survives_kill_9_under_bench_serving(tmp_path, ckpt):
    store = tmp_path / "store"
    port = free_port()
    flags = server_flags(ckpt, port, "file", {"storage_dir": str(store), "capacity_bytes": 6 << 20})
    run = Run(tmp_path, flags, ckpt, f"http://127.0.0.1:{port}")
    try:
        run(Run.restart_server, seed=11)
        run.assert_right()
        counts = run.checker.counts
        assert counts["down"] > 0 and counts["storage_hit_tokens"] > 0, f"no page was read back: {counts}"
        used = run.settled_metric("used_bytes")
        corrupt = run.settled_metric("corrupt")
        pages, bad, tmps, total = file_audit(store)
        print(
            f"\nfile, kill -9 x{KILLS} at {run.at} s: bench_serving {successful(run.bench_text)} successful; "
            f"checked {dict(counts)}; {pages} page files, {len(bad)} torn, {tmps} temporary left; usage counter "
            f"{used:.0f} vs {total} bytes on disk; refused as corrupt by the last server: {corrupt:.0f}"
        )
        assert not bad, bad[:5]
        assert used == total, f"the usage counter says {used:.0f} bytes, the directory holds {total}"
        assert corrupt == 0
    finally:
        run.close()


def test_hf3fs_survives_kill_9_under_bench_serving(tmp_path, ckpt):
    hf3fs_conftest = _load("hf3fs_plugin_conftest", HERE.parent / "plugins" / "hf3fs" / "tests" / "conftest.py")
    meta = hf3fs_conftest.MetadataServer(None, "--lease-s", "2")
    meta.start()
    port = free_port()
    extra = {
        "file_path_prefix": str(tmp_path / "hf3fs" / "data"),
        "file_size": 64 << 20,
        "numjobs": 4,
        "metadata_server_url": meta.url,
    }
    flags = server_flags(ckpt, port, "hf3fs", extra)
    run = Run(tmp_path, flags, ckpt, f"http://127.0.0.1:{port}")
    try:
        run(Run.restart_server, seed=12)
        run.assert_right()
        counts = run.checker.counts
        assert counts["down"] > 0 and counts["storage_hit_tokens"] > 0, f"no page was read back: {counts}"
        time.sleep(3)  # past the lease: what the killed servers reserved and never confirmed comes back
        stats = []
        for rank in hf3fs_ranks(meta.url):
            with urllib.request.urlopen(f"{meta.url}/{rank}/stats", timeout=10) as r:
                stats.append(json.loads(r.read()))
        print(
            f"\nhf3fs, kill -9 x{KILLS} at {run.at} s: bench_serving {successful(run.bench_text)} successful; "
            f"checked {dict(counts)}; slots {stats}"
        )
        assert stats, "the metadata server knows no rank"
        for st in stats:
            assert st["lost"] == 0 and st["doubled"] == 0 and st["reserved"] == 0, st
            assert st["keys"] + st["free"] == st["num_pages"] and st["keys"] > 0, st
    finally:
        run.close()
        meta.stop()


def hf3fs_ranks(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/ranks", timeout=10) as r:
        return json.loads(r.read())["ranks"]


def test_mooncake_master_killed_under_bench_serving(tmp_path, ckpt):
    mooncake_conftest = _load("mooncake_crash_conftest", HERE.parent / "plugins" / "mooncake" / "tests" / "conftest.py")
    master = mooncake_conftest.Master(str(tmp_path))
    master.start()
    port = free_port()
    flags = server_flags(ckpt, port, "mooncake", master.extra(reconnect_after_s=1.0, connect_timeout_s=5))
    run = Run(tmp_path, flags, ckpt, f"http://127.0.0.1:{port}")

    def kill_master(r: Run) -> None:
        master.stop()  # kill -9 of mooncake_master: every page it held is gone with it
        time.sleep(random.uniform(0.2, 1.0))
        master.start()

    try:
        run(kill_master, seed=13)
        run.assert_right()
        counts = run.checker.counts
        assert counts["down"] == 0, f"the server stopped answering while the master was down: {counts}"
        # the master is back: pages are written again and read again
        assert run.server.call("POST", "/flush_cache", key=ADMIN)[0] == 200
        before = run.server.metric("sglang:backuped_tokens_total", key=ADMIN)
        prompt = [5 + (i % 250) for i in range(6 * PS)] + [9]
        first = run.checker.generate(prompt)
        deadline = time.monotonic() + 30
        while run.server.metric("sglang:backuped_tokens_total", key=ADMIN) <= before:
            assert time.monotonic() < deadline, "nothing was written to mooncake after the master came back"
            time.sleep(0.2)
        time.sleep(1.0)
        assert run.server.call("POST", "/flush_cache", key=ADMIN)[0] == 200
        again = run.checker.generate(prompt)
        print(
            f"\nmooncake master kill -9 x{KILLS} at {run.at} s: bench_serving {successful(run.bench_text)} "
            f"successful; checked {dict(counts)}; after the last restart a prompt came back from storage with "
            f"{again['meta_info']['cached_tokens_details']}"
        )
        assert again["output_ids"] == first["output_ids"]
        assert again["meta_info"]["cached_tokens_details"].get("storage", 0) > 0, again["meta_info"]
        assert "Traceback" not in run.server.log.read_text()
    finally:
        run.close()
        master.stop()
