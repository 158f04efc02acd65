"""The in-memory reference backend passes the conformance kit."""

import uuid

from hicache_core.testing import BackendConformance


class TestMemoryBackend(BackendConformance):
    backend_name = "memory"

    def extra_config(self, tmp_path):
        # one store per test: instances inside a test share it, tests do not see each other's pages
        if not hasattr(self, "_store"):
            self._store = f"conformance-{uuid.uuid4().hex}"
        return {"store": self._store}
