"""What ``hicache bench storage`` compares the mooncake backend with: the raw client on the same buffer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hicache_plugin_mooncake.store import MooncakeStore


class RawMooncakeLoop:
    """The raw client doing the same batch_put_from / batch_get_into on the same buffer (no plugin in between)."""

    name = "raw Mooncake client batch_put_from/batch_get_into"

    def __init__(self, backend: MooncakeStore) -> None:
        self.b = backend
        self.keys: list[str] = []

    def set(self, keys, host_indices) -> None:
        ps = self.b.mem_pool_host.page_size
        self.keys = []
        for i in range(0, len(keys), 128):
            idx = host_indices[i * ps : (i + 128) * ps]
            ptrs, sizes = self.b.mem_pool_host.get_page_buffer_meta(idx)
            raw = [f"raw-{k}{p}" for k in keys[i : i + 128] for p in self.b.parts]
            rc = self.b.store.batch_put_from(raw, ptrs, sizes)
            if any(r != 0 for r in rc):
                raise RuntimeError(f"raw batch_put_from failed: {sorted(set(rc))}")
            self.keys += raw

    def get(self, keys, host_indices) -> None:
        ps = self.b.mem_pool_host.page_size
        for i in range(0, len(keys), 128):
            idx = host_indices[i * ps : (i + 128) * ps]
            ptrs, sizes = self.b.mem_pool_host.get_page_buffer_meta(idx)
            raw = [f"raw-{k}{p}" for k in keys[i : i + 128] for p in self.b.parts]
            rc = self.b.store.batch_get_into(raw, ptrs, sizes)
            if any(r <= 0 for r in rc):
                raise RuntimeError(f"raw batch_get_into failed: {sorted(set(rc))}")

    def cleanup(self) -> None:
        if self.keys:  # force: a just-read key may still hold a lease, and a full segment slows every later put
            self.b.store.remove_by_regex("^raw-", True)
        self.keys = []
