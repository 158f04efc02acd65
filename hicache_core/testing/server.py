"""`hicache serve` in a process of its own, for tests: started on a free port, a small HTTP client, stopped (or
killed) at the end. tests_serve, the HTTP soak and the crash tests in the sglang env share it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
# a random model small enough that thousands of requests take seconds (the fuzz, the HTTP soak)
TINY_MODEL = (
    "--hidden-size",
    "64",
    "--intermediate-size",
    "128",
    "--num-layers",
    "2",
    "--num-heads",
    "2",
    "--num-kv-heads",
    "1",
    "--head-dim",
    "32",
)


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def kill(self) -> None:
        """``kill -9``: no shutdown, no flush, whatever was in flight is cut where it stood."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def metric(self, name: str, key: Optional[str] = None, **labels: str) -> Optional[float]:
        """One sample of /metrics (``name``, with every given label), or None."""
        status, text, _ = self.call("GET", "/metrics", key=key)
        assert status == 200, text
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
        return None

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            body = r.read().decode()
        return json.loads(body) if body.startswith(("{", "[")) else body

    def post(self, path: str, body, method: str = "POST"):
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                text = r.read().decode()
                return r.status, (json.loads(text) if text.startswith(("{", "[")) else text)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode())

    def call(self, method: str, path: str, body=None, key=None, headers=None):
        """(status, parsed body, response headers) of one request, with ``key`` as its bearer key."""
        h = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                text, status, got = r.read().decode(), r.status, r.headers
        except urllib.error.HTTPError as e:
            text, status, got = e.read().decode(), e.code, e.headers
        return status, (json.loads(text) if text.startswith(("{", "[")) else text), got

    def generate(self, body) -> dict:
        status, out = self.post("/generate", body)
        assert status == 200, out
        return out


@contextlib.contextmanager
def serve(
    tmp_path: Path, *flags: str, cwd: Optional[Path] = None, pythonpath: Sequence[str] = (), check_alive: bool = True
) -> Iterator[Server]:
    """Start `hicache serve` on a free port; yield a :class:`Server`; stop it (its log is shown on failure).
    ``pythonpath``: folders the server imports from besides the repository (a dynamic backend's module);
    ``check_alive``: whether the server must still run at the end (not when the test killed it)."""
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *map(str, pythonpath)]))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hicache_core.cli",
                "serve",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--log-level",
                "warning",
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"hicache serve did not start (exit {proc.poll()}):\n{log.read_text()}")
            time.sleep(0.1)
        server = Server(proc, f"http://127.0.0.1:{port_file.read_text()}", log)
        assert server.get("/health") == ""
        yield server
        if check_alive:
            assert proc.poll() is None, f"the server died:\n{log.read_text()}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
