"""A file store that misbehaves, for a server process to load by ``dynamic`` (the HTTP soak's L3).

``hicache serve --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
'{"backend_name": "faulty_file", "module_path": "faulty_store", "class_name": "FaultyFileStore", "interface_v1": 1,
"storage_dir": "...", "fault_rate": 0.1, "fault_seed": 1}'`` (with this folder on ``PYTHONPATH``): the real file
backend underneath, and a ``fault_rate`` share of calls that raise, hang past the io deadline, answer with the wrong
shape, or damage the page files just written (which the file backend's checksums must then refuse). How many of each
it injected shows in ``get_stats()`` (``injected_<mode>``), so in ``/metrics``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

from hicache_plugin_file import FileStorage

MODES = ("raise", "hang", "short_result", "long_result", "bad_exists", "corrupt")


class FaultyFileStore:
    def __init__(self, storage_config: Any, extra_config: Any = None) -> None:
        extra = dict(extra_config or {})
        self.rate = float(extra.pop("fault_rate", 0.1))
        self.hang_s = float(extra.pop("fault_hang_s", 0.5))
        self.rng = random.Random(int(extra.pop("fault_seed", 1)))
        self.inner = FileStorage(storage_config, extra)
        self._lock = threading.Lock()
        self.injected = dict.fromkeys(MODES, 0)

    def _fault(self, *allowed: str) -> str:
        with self._lock:
            if self.rng.random() >= self.rate:
                return ""
            mode = self.rng.choice(allowed)
            self.injected[mode] += 1
            return mode

    def register_mem_pool_host(self, host_pool: Any) -> None:
        self.inner.register_mem_pool_host(host_pool)

    def batch_exists(self, keys: Any, extra_info: Any = None) -> Any:
        mode = self._fault("raise", "bad_exists")
        if mode == "raise":
            raise ConnectionResetError("injected: connection reset by peer")
        if mode == "bad_exists":
            return self.rng.choice([True, "3", -1, len(keys) + 5, None, 2.5])
        return self.inner.batch_exists(keys)

    def batch_get_v1(self, keys: Any, host_indices: Any, extra_info: Any = None) -> Any:
        mode = self._fault("raise", "hang", "short_result", "long_result")
        if mode == "raise":
            raise OSError("injected: I/O error")
        if mode == "hang":
            time.sleep(self.hang_s)  # past the deadline: the guard must not let these bytes be served
        res = self.inner.batch_get_v1(keys, host_indices)
        if mode == "short_result":
            return list(res)[:-1] or None
        if mode == "long_result":
            return list(res) + [True] * 3
        return res

    def batch_set_v1(self, keys: Any, host_indices: Any, extra_info: Any = None) -> Any:
        mode = self._fault("raise", "hang", "corrupt")
        if mode == "raise":
            raise TimeoutError("injected: write timed out")
        if mode == "hang":
            time.sleep(self.hang_s)
        res = self.inner.batch_set_v1(keys, host_indices)
        if mode == "corrupt":
            for k in keys:  # a disk that flips bytes after the write: the checksum must catch it on read
                path = self.inner._path(k)
                try:
                    with open(path, "r+b") as f:
                        f.seek(max(0, os.path.getsize(path) - 7))
                        f.write(b"\xde\xad\xbe\xef")
                except OSError:
                    pass
        return res

    def get_stats(self) -> dict:
        out = dict(self.inner.get_stats())
        with self._lock:
            out.update({f"injected_{k}": v for k, v in self.injected.items()})
        return out

    def clear(self) -> Any:
        return self.inner.clear()

    def close(self) -> None:
        self.inner.close()
