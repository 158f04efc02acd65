"""A real mooncake_master on loopback for the tests: free ports, HTTP metadata server built in."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


class Master:
    """mooncake_master bound to 127.0.0.1; restartable on the same ports."""

    def __init__(self, log_dir: str, *flags: str) -> None:
        self.binary = shutil.which("mooncake_master")
        if not self.binary:
            pytest.fail(
                "mooncake_master is not on PATH: pip install 'hicache-plugin-mooncake[cpu]' "
                "(mooncake-transfer-engine-non-cuda ships it) and apt-get install libibverbs1"
            )
        self.rpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = os.path.join(log_dir, "mooncake_master.log")
        self.proc: subprocess.Popen | None = None
        self.flags = flags  # more of mooncake_master's own flags (e.g. --client_ttl=2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metadata"

    def extra(self, **more) -> dict:
        return {
            "master_server_address": self.address,
            "metadata_server": self.metadata,
            "protocol": "tcp",
            "local_hostname": "127.0.0.1",
            "global_segment_size": "64mb",
            "local_buffer_size": "16mb",
            "connect_timeout_s": 20,
            "master_metrics_port": self.metrics_port,
            **more,
        }

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--enable_http_metadata_server=true",
                    "--http_metadata_server_host=127.0.0.1",
                    f"--http_metadata_server_port={self.http_port}",
                    f"--rpc_port={self.rpc_port}",
                    f"--metrics_port={self.metrics_port}",
                    "--default_kv_lease_ttl=100",
                    *self.flags,
                ],
                stdout=log,
                stderr=log,
            )
        if not (_wait_port(self.rpc_port, 20) and _wait_port(self.http_port, 20)):
            self.stop()
            pytest.fail(
                f"mooncake_master did not start listening; see {self.log_path}:\n"
                + Path(self.log_path).read_text(errors="replace")[-2000:]
            )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def master(tmp_path_factory):
    m = Master(str(tmp_path_factory.mktemp("mooncake")))
    m.start()
    yield m
    m.stop()
