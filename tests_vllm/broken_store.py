"""A storage backend that claims every page and never delivers one: ``exists`` says yes, and ``get`` raises
(``{"fault": "raise"}``), hangs past hicache's deadline (``{"fault": "hang"}``), or hangs on its first call
and raises on every later one (``{"fault": "both"}``). Every request vLLM admits is
offered a storage hit whose load then fails, so each one goes through vLLM's recompute path."""

import time


class BrokenStore:
    def __init__(self, storage_config=None, extra_config=None):
        self.fault = (extra_config or {}).get("fault", "raise")
        self.log = (extra_config or {}).get("log")  # a file: one line per get, so the test sees loads were tried

    def exists(self, key):
        return True

    def get(self, key, target_location=None):
        if self.log:
            with open(self.log, "a") as f:
                f.write(key + "\n")
        hang = self.fault == "hang" or (self.fault == "both" and not getattr(self, "hung", False))
        self.hung = True
        if hang:
            time.sleep(30)
        raise RuntimeError("the storage service is down")

    def set(self, key, value):
        raise RuntimeError("the storage service is down")
