"""Positional I/O on a rank's file: 3FS's usrbio rings when ``hf3fs_fuse`` is importable and the file is on a 3FS
mount, else plain ``os.preadv`` / ``os.pwritev`` (a 3FS mount is POSIX, and so is any local directory).

An op is ``(offset, buffers)``: the buffers are read or written back to back starting at ``offset``. Batches are
split over ``numjobs`` threads; results are bytes moved per op (negative errno on failure). A read may name a
``check(i, n)`` to run on op ``i`` in the thread that read it, while its bytes are still in that core's cache; its
result is then op ``i``'s result.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Optional

from hicache_core.storage import map_chunked

logger = logging.getLogger(__name__)

Op = tuple[int, list]
Check = Optional[Callable[[int, int], Any]]


class FileClient:
    name = "posix"

    def __init__(self, path: str, size: int, numjobs: int) -> None:
        self.path, self.size, self.numjobs = path, size, numjobs
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)  # sparse: slots take space as they are written
        self._pool = cf.ThreadPoolExecutor(numjobs, thread_name_prefix="hicache-hf3fs") if numjobs > 1 else None

    def _one(self, op: Op, write: bool) -> int:
        offset, bufs = op
        try:
            return os.pwritev(self.fd, bufs, offset) if write else os.preadv(self.fd, bufs, offset)
        except OSError as e:
            return -(e.errno or 5)

    def _run(self, ops: list[Op], write: bool) -> list[int]:
        return map_chunked(self._pool, self.numjobs, len(ops), lambda i: self._one(ops[i], write))

    def batch_read(self, ops: list[Op], check: Check = None) -> list:
        if check is None:
            return self._run(ops, False)
        return map_chunked(self._pool, self.numjobs, len(ops), lambda i: check(i, self._one(ops[i], False)))

    def batch_write(self, ops: list[Op]) -> list[int]:
        return self._run(ops, True)

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class UsrbioClient(FileClient):
    """3FS user-space ring I/O: ops go through a shared-memory iov registered with the 3FS FUSE daemon, ``entries``
    at a time per ring; bytes are copied between the iov and the host pool."""

    name = "usrbio"

    def __init__(self, path: str, size: int, numjobs: int, entries: int, slot_bytes: int) -> None:
        from multiprocessing.shared_memory import SharedMemory

        from hf3fs_fuse.io import deregister_fd, extract_mount_point, make_ioring, make_iovec, register_fd

        super().__init__(path, size, 1)
        self._deregister = deregister_fd
        mount = extract_mount_point(path)
        register_fd(self.fd)
        self.entries, self.slot_bytes = entries, slot_bytes
        self._rings = []
        for for_read in (True, False):
            shm = SharedMemory(size=entries * slot_bytes, create=True)
            iov = make_iovec(shm, mount, 0, -1)
            shm.unlink()
            self._rings.append((shm, iov, make_ioring(mount, entries, for_read, 0), threading.Lock()))

    def _ring_io(self, ops: list[Op], write: bool) -> list[int]:
        shm, iov, ior, lock = self._rings[1 if write else 0]
        buf = shm.buf
        assert buf is not None  # open until close()
        out: list[int] = []
        with lock:
            for start in range(0, len(ops), self.entries):
                chunk = ops[start : start + self.entries]
                lens = []
                for j, (offset, bufs) in enumerate(chunk):
                    base, n = j * self.slot_bytes, sum(len(b) for b in bufs)
                    if write:
                        pos = base
                        for b in bufs:
                            buf[pos : pos + len(b)] = b
                            pos += len(b)
                    ior.prepare(iov[base : base + n], not write, self.fd, offset, userdata=j)
                    lens.append(n)
                results = {r.userdata: r.result for r in ior.submit().wait(min_results=len(chunk))}
                for j, (_, bufs) in enumerate(chunk):
                    r = results.get(j, -5)
                    if not write and r == lens[j]:
                        pos = j * self.slot_bytes
                        for b in bufs:
                            b[:] = buf[pos : pos + len(b)]
                            pos += len(b)
                    out.append(r)
        return out

    def batch_read(self, ops: list[Op], check: Check = None) -> list:
        out = self._ring_io(ops, False)
        return out if check is None else [check(i, n) for i, n in enumerate(out)]

    def batch_write(self, ops: list[Op]) -> list[int]:
        return self._ring_io(ops, True)

    def close(self) -> None:
        if self.fd >= 0:
            self._deregister(self.fd)
        for shm, _, _, _ in self._rings:
            shm.close()
        super().close()


def make_client(path: str, size: int, numjobs: int, entries: int, slot_bytes: int, kind: str = "auto") -> FileClient:
    """``auto``: usrbio when ``hf3fs_fuse`` imports and the path is on a 3FS mount, else POSIX."""
    if kind not in ("auto", "usrbio", "posix"):
        raise ValueError(f"io_client={kind!r}: choose auto, usrbio or posix")
    if kind != "posix":
        try:
            return UsrbioClient(path, size, numjobs, entries, slot_bytes)
        except ImportError as e:
            if kind == "usrbio":
                raise ValueError(
                    f"io_client=usrbio but hf3fs_fuse does not import ({e}); install 3FS's hf3fs_py_usrbio"
                ) from e
        except Exception as e:  # not a 3FS mount, or the FUSE daemon refused
            if kind == "usrbio":
                raise ValueError(f"io_client=usrbio failed on {path!r}: {e}") from e
            logger.info("hf3fs: usrbio unavailable for %s (%s); using POSIX I/O", path, e)
    return FileClient(path, size, numjobs)
