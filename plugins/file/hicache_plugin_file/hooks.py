"""The file backend's hooks for tools: faults for ``hicache certify`` and the conformance kit, and what
``hicache bench storage`` compares it with."""

from __future__ import annotations

import contextlib
import os


class FileHooks:
    """Mixed into :class:`~hicache_plugin_file.store.FileStorage` (``dir``, ``root``, ``_path``, the host pool)."""

    dir: str

    def _path(self, key: str) -> str:  # the store's
        raise NotImplementedError

    @contextlib.contextmanager
    def failing_writes(self):
        """Inside the block a regular file stands where the namespace directory was: every open() under it fails
        with ENOTDIR, as on a dead disk."""
        moved = self.dir + ".away"
        os.rename(self.dir, moved)
        with open(self.dir, "w") as f:
            f.write("not a directory")
        try:
            yield
        finally:
            os.unlink(self.dir)
            os.rename(moved, self.dir)

    def corrupt_stored_page(self, key: str) -> bool:
        """Flip one payload byte of the stored page, as a bad disk would."""
        try:
            with open(self._path(key), "r+b") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([last[0] ^ 0x40]))
            return True
        except OSError:
            return False

    def bench_baseline(self):
        """The plain loop the benchmark compares with: os.write / readinto of the same bytes, same directory."""
        from hicache_plugin_file.baseline import PlainFileLoop

        return PlainFileLoop(os.path.join(self.root, "bench-baseline"), self.mem_pool_host)

    def bench_peer(self):
        """SGLang's HiCacheFile on the same directory's disk, or None where sglang is not importable."""
        from hicache_plugin_file.baseline import SGLangHiCacheFile

        return SGLangHiCacheFile.create(os.path.join(self.root, "bench-sglang"), self.mem_pool_host)
