"""The file backend with ``"layout_compat": "sglang"``: the files of SGLang's ``HiCacheFile``, so SGLang servers and
hicache share one L3 directory -- pages either writes are hits for the other.

SGLang's layout: ``{dir}/{page key}{suffix}.bin`` holding the raw flat page (the host layout's page byte order,
no header), written to a temporary file and renamed into place. ``suffix`` is ``_{model}_{tp_rank}_{tp_size}``
(MHA) or ``_{model}`` (MLA: every rank shares the pages), ``model`` being the model name with ``/`` as ``-``.

What this gives up, by SGLang's design: the files carry no checksum and no namespace beyond model and tp, so a
read is checked only for its exact size, and two configurations of one model that differ in dtype, page size or
layout must not share a directory. hicache's own format (the default) has neither weakness.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from typing import Any, Optional

import torch

from hicache_core.errors import ConfigError
from hicache_core.storage import HiCacheStorage
from hicache_core.storage.options import parse_options
from hicache_plugin_file.directory import FileOptions, resolve_root, secure_directory

logger = logging.getLogger(__name__)


def sglang_suffix(storage_config) -> str:
    """SGLang HiCacheFile's key suffix for a deployment (no pipeline or context parallelism)."""
    model = "-".join((storage_config.model_name or "").split("/"))
    if storage_config.is_mla_model:
        return f"_{model}"
    return f"_{model}_{storage_config.tp_rank}_{storage_config.tp_size}"


class SGLangFileLayout(HiCacheStorage):
    """Extra config: the file backend's (:class:`~hicache_plugin_file.store.FileOptions`) with
    ``layout_compat: "sglang"``; ``storage_dir`` (or SGLang's ``file_storage_path``) names the directory SGLang
    servers use. ``capacity_bytes``, ``fsync`` and ``mac_key`` are not available in SGLang's format."""

    def __init__(self, storage_config, extra_config=None) -> None:
        super().__init__(storage_config, extra_config)
        opts = parse_options(FileOptions, self.extra_config, "file backend (layout_compat sglang)")
        unsupported = [k for k in ("capacity_bytes", "mac_key") if getattr(opts, k)]
        if unsupported:
            raise ConfigError(
                f"file backend: {', '.join(unsupported)} cannot be used with layout_compat 'sglang' "
                "(SGLang's files carry no header); use the default layout for them"
            )
        self.dir = resolve_root(opts)
        secure_directory(self.dir, opts.shared, "file backend (layout_compat sglang)")
        self.suffix = sglang_suffix(storage_config)
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(
            ("get_pages", "get_misses", "wrong_size", "set_pages", "set_skipped", "set_failed"), 0
        )

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, f"{key}{self.suffix}.bin")

    # --- one flat page -------------------------------------------------------------------------------------------
    def _write(self, key: str, flat: torch.Tensor) -> bool:
        path = self._path(key)
        if os.path.exists(path):
            self._count("set_skipped")
            return True
        tmp = os.path.join(self.dir, f".{uuid.uuid4().hex}.tmp")
        try:
            flat.contiguous().view(torch.uint8).numpy().tofile(tmp)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("file backend (sglang layout): writing %s failed: %s", path, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._count("set_failed")
            return False
        self._count("set_pages")
        return True

    def _read(self, key: str, out: torch.Tensor) -> bool:
        """Read a page into ``out``; only a file of exactly the page's size is served."""
        want = out.numel() * out.element_size()
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != want:
                    self._count("wrong_size")
                    return False
                ok = f.readinto(memoryview(out.view(torch.uint8).numpy())) == want  # type: ignore[arg-type]
        except FileNotFoundError:
            ok = False
        except OSError as e:
            logger.warning("file backend (sglang layout): reading %s failed: %s", key, e)
            ok = False
        self._count("get_pages" if ok else "get_misses")
        return ok

    # --- v1 on the host pool (flat pages: SGLang's byte order) ---------------------------------------------------
    def batch_set_v1(self, keys, host_indices) -> list[bool]:
        ps = self.mem_pool_host.page_size
        return [self._write(k, self.mem_pool_host.get_flat_page(int(host_indices[i * ps]))) for i, k in enumerate(keys)]

    def batch_get_v1(self, keys, host_indices) -> list[bool]:
        pool, ps = self.mem_pool_host, self.mem_pool_host.page_size
        out = []
        for i, key in enumerate(keys):
            buf = pool.dummy_flat_page()
            ok = self._read(key, buf)
            if ok:
                pool.set_flat_page(int(host_indices[i * ps]), buf)
            out.append(ok)
        return out

    def batch_exists(self, keys) -> int:
        for i, k in enumerate(keys):
            if not os.path.exists(self._path(k)):
                return i
        return len(keys)

    # --- v0 --------------------------------------------------------------------------------------------------------
    def get(self, key, target_location: Optional[torch.Tensor] = None):
        out = target_location if target_location is not None else self.mem_pool_host.dummy_flat_page()
        return out if self._read(key, out) else None

    def set(self, key, value) -> bool:
        return self._write(key, value)

    def exists(self, key) -> bool:
        return os.path.exists(self._path(key))

    # --- housekeeping ----------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Remove this deployment's pages (files with its suffix); other models and ranks keep theirs."""
        end = f"{self.suffix}.bin"
        for name in os.listdir(self.dir):
            if name.endswith(end):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, name))

    def get_stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats)

    def describe(self) -> str:
        return f"directory {self.dir} (SGLang HiCacheFile layout, files *{self.suffix}.bin)"
