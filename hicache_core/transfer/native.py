"""The streaming piece copier (``ntcopy.c``), built with the machine's C compiler on first use.

CPU pools move KV in pieces of 1-128 KiB; memcpy writes each through the cache (it streams only copies above
glibc's non-temporal threshold, hundreds of MiB), so a large transfer reads every destination line before
overwriting it. ``ntcopy.c`` streams the stores instead. It is compiled once per machine and source into
``$HICACHE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/hicache`` or ``~/.cache/hicache``, else the temp directory), as
Triton builds its launchers. Where no compiler works, or ``HICACHE_NATIVE_COPY=0``, :func:`copier` is None and the
direct io copies with numpy, as before; a failed build is logged once with the compiler's message.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("ntcopy.c")
_FLAGS = ["-O2", "-shared", "-fPIC"]
_LOCK = threading.Lock()
_LIB: list = []  # [] not tried yet; [None] unavailable; [lib] built


def _cache_dirs() -> list[Path]:
    env = os.environ.get("HICACHE_CACHE_DIR")
    if env:
        return [Path(env)]
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [Path(xdg) / "hicache", Path(tempfile.gettempdir()) / f"hicache-{os.getuid()}"]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str) -> Path:
    source = _SRC.read_bytes()
    tag = hashlib.sha256(source + " ".join([cc, *_FLAGS, platform.machine(), sys.platform]).encode()).hexdigest()
    errors = []
    for d in _cache_dirs():
        target = d / f"ntcopy-{tag[:16]}.so"
        if target.exists():
            return target
        try:
            d.mkdir(parents=True, exist_ok=True)
            # built beside the target and renamed into place: ranks starting together never load a half-written file
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
            os.close(fd)
            proc = subprocess.run(
                [cc, *_FLAGS, "-o", tmp, str(_SRC)], capture_output=True, text=True, timeout=120, check=False
            )
            if proc.returncode:
                os.unlink(tmp)
                raise OSError(f"{cc} exited {proc.returncode}: {proc.stderr.strip()[:500]}")
            os.replace(tmp, target)
            return target
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{d}: {e}")
    raise OSError("; ".join(errors))


def copier():
    """The loaded library (``hc_copy_pieces``), or None where it cannot be had (see the module doc)."""
    if _LIB:
        return _LIB[0]
    with _LOCK:
        if _LIB:
            return _LIB[0]
        lib = None
        if os.environ.get("HICACHE_NATIVE_COPY", "1") != "0":
            cc = _compiler()
            try:
                if cc is None:
                    raise OSError("no C compiler (cc, gcc, clang or $CC) on PATH")
                lib = ctypes.CDLL(str(_build(cc)))
                lib.hc_copy_pieces.restype = None
                # (dst, src, dst_off, src_off, count, piece, stream)
                lib.hc_copy_pieces.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
            except OSError as e:
                logger.warning(
                    "hicache: the streaming copier could not be built (%s); CPU pools copy with numpy instead "
                    "(install a C compiler, or set HICACHE_NATIVE_COPY=0 to silence this)",
                    e,
                )
                lib = None
        _LIB.append(lib)
        return lib
