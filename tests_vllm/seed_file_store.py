"""The seed's custom backend shape -- get(key), exists(key), set(key, value), nothing else -- keeping pages as files
under $SEED_STORE_DIR, so vLLM's scheduler and worker processes (and a second vLLM) see the same pages.
Loaded by ``dynamic`` (module_path/class_name), as a vendor's class would be."""

import os

import torch


class SeedFileStore:
    def _path(self, key):
        return os.path.join(os.environ["SEED_STORE_DIR"], key + ".pt")

    def get(self, key):
        try:
            return torch.load(self._path(key))
        except FileNotFoundError:
            return None

    def exists(self, key):
        return os.path.exists(self._path(key))

    def set(self, key, value):
        tmp = self._path(key) + f".{os.getpid()}.tmp"
        torch.save(value.clone(), tmp)
        os.replace(tmp, self._path(key))
        return True
