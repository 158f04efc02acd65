"""What ``hicache bench storage`` compares the file backend with: the plainest loop over the same bytes, and
SGLang's own file backend where sglang is importable."""

from __future__ import annotations

import os

import torch


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

    def close(self) -> None:
        os.rmdir(self.dir)


class SGLangHiCacheFile:
    """SGLang's own ``HiCacheFile`` (v0: one ``.bin`` per page, no header, no checksum) writing ready flat tensors
    and reading into them: the peer the file backend's get and set are held to. Its flat tensors are made from the
    pool's pages before the clock starts (:meth:`prepare`), so it is timed without the gather or scatter that
    SGLang's controller adds around it for a layer-first pool; what it read is checked after (:meth:`verify`)."""

    name = "SGLang HiCacheFile (ready flat tensors)"

    def __init__(self, directory: str, pool, store) -> None:
        self.dir, self.pool = directory, pool
        self.store = store
        self.values: list = []
        self.targets: list = []

    @classmethod
    def create(cls, directory: str, pool):
        """None where sglang is not importable, or its HiCacheFile cannot be built the way 0.5.x builds it."""
        try:
            from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig

            sc = HiCacheStorageConfig(
                tp_rank=0,
                tp_size=1,
                pp_rank=0,
                pp_size=1,
                attn_cp_rank=0,
                attn_cp_size=1,
                is_mla_model=pool.is_mla,
                enable_storage_metrics=False,
                is_page_first_layout=pool.layout != "layer_first",
                model_name="hicache-bench",
                extra_config={"file_storage_path": directory},
            )
            os.makedirs(directory, exist_ok=True)
            return cls(directory, pool, HiCacheFile(sc))
        except Exception:  # not installed, an sglang that does not import here, or another constructor
            return None

    def prepare(self, host_indices) -> None:
        ps = self.pool.page_size
        starts = host_indices[::ps].tolist()
        self.values = [self.pool.get_flat_page(s) for s in starts]
        self.targets = [torch.empty_like(v) for v in self.values]

    def set(self, keys, host_indices) -> None:
        if not self.store.batch_set(list(keys), self.values):
            raise RuntimeError("SGLang's HiCacheFile failed to store a page")

    def get(self, keys, host_indices) -> None:
        if any(r is None for r in self.store.batch_get(list(keys), self.targets)):
            raise RuntimeError("SGLang's HiCacheFile missed a page it stored")

    def verify(self) -> None:
        if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(self.values, self.targets)):
            raise RuntimeError("SGLang's HiCacheFile read back other bytes than it wrote")

    def cleanup(self) -> None:
        for f in os.listdir(self.dir):
            if f.endswith(".bin"):
                os.unlink(os.path.join(self.dir, f))

    def close(self) -> None:
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
        os.rmdir(self.dir)
