"""A real HTTP metadata server (hicache-hf3fs-metadata) on loopback, started and stopped by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MetadataServer:
    def __init__(self, persist_path: str | None = None, *more_args: str) -> None:
        self.port = free_port()
        self.persist_path = persist_path
        self.more_args = list(more_args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "hicache_plugin_hf3fs.server", "--port", str(self.port), "--save-interval", "0.2"]
        if self.persist_path:
            argv += ["--persist-path", self.persist_path]
        argv += self.more_args
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"hicache-hf3fs-metadata exited: {self.proc.stdout.read()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        pytest.fail("hicache-hf3fs-metadata did not start listening within 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # graceful: the index is saved at shutdown
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None


@pytest.fixture(scope="session")
def metadata_server():
    s = MetadataServer()
    s.start()
    yield s
    s.stop()
