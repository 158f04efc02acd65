"""``hicache bench pd``'s instances: the ``hicache serve`` prefill and decode processes a run starts, their
flags, their logs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hicache_core.config import HiCacheConfig, add_hicache_args
from hicache_core.errors import HiCacheError


def add_instance_hicache_args(p: argparse.ArgumentParser, page_size: int, hicache_ratio: float) -> None:
    """The HiCache flags (SGLang's names) of a bench whose instances are ``hicache serve`` processes, defaulting
    to the file backend, direct io and wait_complete prefetch."""
    add_hicache_args(p)
    p.set_defaults(
        page_size=page_size,
        hicache_ratio=hicache_ratio,
        hicache_io_backend="direct",
        hicache_storage_backend="file",
        hicache_storage_prefetch_policy="wait_complete",
    )


def hicache_flags(args: argparse.Namespace, storage_dir: str, store: bool) -> list[str]:
    """The cache flags every instance gets: this run's --hicache-* (storage only where the configuration has it)."""
    cfg = HiCacheConfig.from_args(args)
    flags = [
        "--page-size",
        str(cfg.page_size),
        "--enable-hierarchical-cache",
        "--hicache-ratio",
        str(cfg.hicache_ratio),
        "--hicache-io-backend",
        cfg.hicache_io_backend,
        "--hicache-mem-layout",
        cfg.hicache_mem_layout,
        "--hicache-write-policy",
        cfg.hicache_write_policy,
        "--hicache-storage-prefetch-policy",
        cfg.hicache_storage_prefetch_policy,
    ]
    if cfg.hicache_size:
        flags += ["--hicache-size", str(cfg.hicache_size)]
    if store:
        extra = dict(cfg.hicache_storage_backend_extra_config)
        extra.setdefault("prefetch_threshold", cfg.page_size)  # a page of a reply decode offloaded is worth it
        if cfg.hicache_storage_backend == "file":
            extra.setdefault("storage_dir", storage_dir)
        flags += [
            "--hicache-storage-backend",
            str(cfg.hicache_storage_backend),
            "--hicache-storage-backend-extra-config",
            json.dumps(extra),
        ]
    return flags


class Instances:
    """Start ``hicache serve`` processes in parallel, wait until each serves, stop them all."""

    def __init__(self, specs: list[tuple[str, list[str]]], workdir: str, timeout: float) -> None:
        self.specs, self.workdir, self.timeout = specs, workdir, timeout
        self.procs: list[tuple[str, subprocess.Popen, str]] = []
        self.urls: dict[str, str] = {}

    def __enter__(self) -> Instances:
        try:
            for name, flags in self.specs:
                log = os.path.join(self.workdir, f"{name}.log")
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
                            os.path.join(self.workdir, f"{name}.port"),
                            "--log-level",
                            "warning",
                            *flags,
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                self.procs.append((name, proc, log))
            deadline = time.monotonic() + self.timeout
            for name, proc, log in self.procs:
                port_file = os.path.join(self.workdir, f"{name}.port")
                while not (os.path.exists(port_file) and Path(port_file).read_text().strip()):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        why = f"exited with {proc.returncode}" if proc.poll() is not None else "did not start in time"
                        raise HiCacheError(
                            f"instance {name} ({' '.join(self.specs_of(name))}) {why}; its log:\n{_tail(log)}"
                        )
                    time.sleep(0.05)
                self.urls[name] = f"http://127.0.0.1:{Path(port_file).read_text().strip()}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def specs_of(self, name: str) -> list[str]:
        return dict(self.specs)[name]

    def check_alive(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise HiCacheError(f"instance {name} died (exit {proc.returncode}); its log:\n{_tail(log)}")

    def __exit__(self, *exc: Any) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"
