"""A storage backend that claims every page and never delivers one: ``exists`` says yes, and ``get`` raises
(``{"fault": "raise"}``) or hangs past hicache's deadline (``{"fault": "hang"}``). Every request vLLM admits is
offered a storage hit whose load then fails, so each one goes through vLLM's recompute path."""

import time


class BrokenStore:
    def __init__(self, storage_config=None, extra_config=None):
        self.fault = (extra_config or {}).get("fault", "raise")

    def exists(self, key):
        return True

    def get(self, key, target_location=None):
        if self.fault == "hang":
            time.sleep(30)
        raise RuntimeError("the storage service is down")

    def set(self, key, value):
        raise RuntimeError("the storage service is down")
