"""A tiny llama checkpoint made with transformers, and `hicache serve` processes started and stopped per test."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hicache_core.testing.checkpoint import CHAT_TEMPLATE, CORPUS, make_checkpoint  # noqa: F401 (tests import them from here)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hf(checkpoint):
    """transformers' own model and tokenizer on the checkpoint (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def hf_generate(hf, ids: list[int], n: int) -> list[int]:
    import torch

    model, tok = hf
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=tok.eos_token_id,
        )
    return out[0, len(ids) :].tolist()


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

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
def serve(tmp_path: Path, *flags: str, cwd: Path | None = None):
    """Start `hicache serve` on a free port; yield a :class:`Server`; stop it (its log is shown on failure)."""
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
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
        assert proc.poll() is None, f"the server died:\n{log.read_text()}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
