"""``hicache bench fingerprint``: what the model fingerprint costs at start, per GB of weights, beside reading the
same bytes (the baseline: a server reads its weights anyway), cold (page cache dropped) and warm, and with the memo
a restart finds (nothing read).

Without ``--model-path`` it digests a synthetic checkpoint of ``--size-gb`` (random bytes in one
``model.safetensors``) in a temp directory."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from hicache_core.bench.common import dump_json, print_table
from hicache_core.bench.options import int_option
from hicache_core.parse import arg_float


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, metavar="DIR|FILE.gguf", help="a checkpoint (default: synthetic)")
    p.add_argument(
        "--size-gb",
        type=arg_float(0, above=True),
        default=1.0,
        help="the synthetic checkpoint's weights in GB (default %(default)s)",
    )
    int_option(p, "--repeat", 1, 100, 3, "runs per measurement, median")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _drop_cache(files: list[Path]) -> None:
    """Ask the kernel to forget the files' pages (``posix_fadvise`` DONTNEED), so the next read is from disk."""
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())  # dirty pages are not dropped
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _read_all(files: list[Path]) -> None:
    buf = bytearray(8 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _median(fn, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(args: argparse.Namespace) -> int:
    from hicache_core import identity

    tmp = None
    path = Path(args.model_path).expanduser() if args.model_path else None
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="hicache-fp-"))
        path = tmp / "synthetic"
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "llama"}')
        with open(path / "model.safetensors", "wb") as f:
            left = int(args.size_gb * 1e9)
            block = os.urandom(16 << 20)
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
    try:
        files = identity.checkpoint_files(path)
        nbytes = sum(f.stat().st_size for f in files)
        gb = nbytes / 1e9
        cold = lambda: _drop_cache(files)  # noqa: E731
        rows: list[dict[str, Any]] = []
        for label, fn, before in (
            ("read, cold (baseline)", lambda: _read_all(files), cold),
            ("fingerprint, cold", lambda: identity.checkpoint_fingerprint(path, memo=False), cold),
            ("read, warm (baseline)", lambda: _read_all(files), None),
            ("fingerprint, warm", lambda: identity.checkpoint_fingerprint(path, memo=False), None),
        ):
            s = _median(fn, args.repeat, before)
            rows.append({"what": label, "s": s, "s_per_gb": s / gb, "gbps": gb / s})
        identity.checkpoint_fingerprint(path)  # writes the memo a restart finds
        s = _median(lambda: identity.checkpoint_fingerprint(path), args.repeat)
        rows.append({"what": "fingerprint, memo (restart)", "s": s, "s_per_gb": s / gb, "gbps": None})
        for r in rows:
            base = rows[0] if "cold" in r["what"] else rows[2]
            r["vs_read"] = r["s"] / base["s"]
        if args.json:
            dump_json({"path": str(path), "bytes": nbytes, "rows": rows})
            return 0
        print(f"\nhicache bench fingerprint: {len(files)} files, {gb:.2f} GB ({path})\n")
        print_table(
            rows,
            "what=measurement:s; s=seconds:.3f; s_per_gb=s per GB:.3f; gbps=GB/s:.2f; vs_read=x read time:.2f",
        )
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
