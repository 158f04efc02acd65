"""What ``hicache bench storage`` compares the file backend with: the plainest loop over the same bytes."""

from __future__ import annotations

import os


class PlainFileLoop:
    """One file per page written with os.write and read with readinto, no header, no checksum, one thread."""

    name = "os.write/readinto loop"

    def __init__(self, directory: str, pool) -> None:
        self.dir, self.pool = directory, pool
        os.makedirs(directory, exist_ok=True)

    def set(self, keys, host_indices) -> None:
        for key, segs in zip(keys, self.pool.page_memoryviews(host_indices)):
            fd = os.open(os.path.join(self.dir, key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for s in segs:
                    os.write(fd, s)
            finally:
                os.close(fd)

    def get(self, keys, host_indices) -> None:
        for key, segs in zip(keys, self.pool.page_memoryviews(host_indices)):
            with open(os.path.join(self.dir, key), "rb", buffering=0) as f:
                for s in segs:
                    f.readinto(s)

    def cleanup(self) -> None:
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
