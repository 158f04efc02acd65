"""The file backend's directory: its options, where it is, who may write it, and how full it is (for every
process using it)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import struct
import threading
import time
from typing import Optional

import attrs

from hicache_core.errors import ConfigError
from hicache_core.storage.options import boolean, choice, option, size, text, whole

ENV_DIR = "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"
USAGE_FILE = ".hicache-usage"


@attrs.frozen(kw_only=True)
class FileOptions:
    """The file backend's extra config."""

    storage_dir: Optional[str] = option(
        None,
        text,
        "directory of the pages (else $SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR, "
        "else $XDG_CACHE_HOME/hicache, else /tmp/hicache-$UID)",
    )
    file_storage_path: Optional[str] = option(None, text, "SGLang HiCacheFile's name for storage_dir")
    capacity_bytes: int = option(0, size, "bytes of pages the whole directory may hold (0 = unlimited; LRU eviction)")
    io_threads: Optional[int] = option(
        None,
        whole(1, 256),
        "parallel page I/O within a batch (default: 4, or the "
        "CPU cores where fewer: more threads than cores is slower)",
    )
    fsync: bool = option(False, boolean, "flush each page to disk before publishing it")
    layout_compat: str = option(
        "hicache", choice("hicache", "sglang"), "hicache (checksummed pages) or sglang (SGLang HiCacheFile's files)"
    )
    shared: bool = option(
        False,
        boolean,
        "the directory is shared with other users on purpose: skip the owner/permission check (use mac_key)",
    )
    mac_key: Optional[str] = option(
        None,
        text,
        "sign pages with HMAC-SHA256 under this key (else $HICACHE_FILE_MAC_KEY); unsigned or forged pages are misses",
    )


def default_root() -> str:
    """The per-user default directory."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(xdg, "hicache") if xdg else f"/tmp/hicache-{os.geteuid()}"


def resolve_root(opts: FileOptions) -> str:
    root = opts.storage_dir or os.environ.get(ENV_DIR) or opts.file_storage_path or default_root()
    return os.path.abspath(os.path.expanduser(root))


def secure_directory(root: str, shared: bool, what: str = "file backend") -> None:
    """Create ``root`` (0700) if missing; refuse one another user owns, or that group or others may write, unless
    ``shared``: anyone who can write the directory can plant pages in it."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        st = os.stat(root)
    except OSError as e:
        raise ConfigError(
            f"{what}: cannot use storage_dir {root!r}: {e.strerror}; give a writable directory in the "
            f"extra config (storage_dir) or ${ENV_DIR}"
        ) from e
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what}: storage_dir {root!r} is not a directory")
    if shared:
        return
    fix = (
        'use a directory of your own (the default is per user), or set "shared": true in the extra config if '
        "it is shared on purpose -- then also set mac_key so pages from other writers are rejected"
    )
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{what}: storage_dir {root!r} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): "
            f"its owner could plant pages that would be served as KV; {fix}"
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"{what}: storage_dir {root!r} is writable by {'group and others' if st.st_mode & 0o002 else 'its group'} "
            f"(mode {stat.S_IMODE(st.st_mode):o}): others could plant pages; chmod 700 it, or {fix}"
        )


ORPHAN_AGE_S = 3600.0  # a temporary file this old is a crashed writer's, whatever its pid says
_TMP = re.compile(r"\.(\d+)\.\d+\.[0-9a-f]+\.tmp$")


def remove_orphan(path: str) -> bool:
    """Remove a temporary page file a crashed writer left (not a live writer's, unless it is very old); True if
    removed."""
    m = _TMP.search(path)
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        return False
    pid = int(m.group(1)) if m else -1
    if pid == os.getpid() or (pid > 0 and pid_alive(pid) and age < ORPHAN_AGE_S):
        return False  # a live writer's file
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


class SharedUsage:
    """Bytes of pages in a directory, one counter for every process using it: 8 bytes in a file, under flock.

    flock excludes other processes only: every thread of this one shares the descriptor, so the lock is theirs
    already and two I/O threads' read-modify-writes interleaved, losing updates (a crash test under load found the
    counter 7 pages below the bytes on disk). A thread lock goes around the flock."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, USAGE_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._threads = threading.Lock()

    @contextlib.contextmanager
    def locked(self):
        with self._threads:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _read(self) -> int:
        data = os.pread(self.fd, 8, 0)
        return struct.unpack("<q", data)[0] if len(data) == 8 else 0

    def _write(self, n: int) -> None:
        os.pwrite(self.fd, struct.pack("<q", max(0, n)), 0)

    def add(self, n: int) -> int:
        with self.locked():
            total = max(0, self._read() + n)
            self._write(total)
            return total

    def value(self) -> int:
        with self.locked():
            return self._read()

    def set(self, n: int) -> None:
        with self.locked():
            self._write(n)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
