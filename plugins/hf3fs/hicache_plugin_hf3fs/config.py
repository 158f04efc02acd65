"""hf3fs configuration: the extra-config JSON, else the JSON file at ``$SGLANG_HICACHE_HF3FS_CONFIG_PATH``, else
single-machine defaults (SGLang's)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import attrs

from hicache_core.config import read_json_object
from hicache_core.errors import ConfigError

CONFIG_PATH_ENV = "SGLANG_HICACHE_HF3FS_CONFIG_PATH"
KEYS = ("file_path_prefix", "file_size", "numjobs", "entries", "metadata_server_url")


def _positive(name: str):
    def check(inst, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"hf3fs: {name}={value!r} must be a whole number > 0 (from {inst.source})")
    return check


@attrs.frozen(kw_only=True)
class Hf3fsConfig:
    file_path_prefix: str = "/data/hicache"
    file_size: int = attrs.field(default=1 << 40, validator=_positive("file_size"))
    numjobs: int = attrs.field(default=16, validator=_positive("numjobs"))
    entries: int = attrs.field(default=8, validator=_positive("entries"))
    metadata_server_url: Optional[str] = None
    source: str = "defaults"

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], source: str) -> Hf3fsConfig:
        kw: dict[str, Any] = {}
        for k in KEYS:
            if k in d and d[k] is not None:
                kw[k] = d[k]
        for k in ("file_size", "numjobs", "entries"):
            if k in kw:
                try:
                    kw[k] = int(kw[k])
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"hf3fs: {k}={d[k]!r} is not a whole number (from {source})") from e
        url = kw.get("metadata_server_url")
        if url and not str(url).startswith(("http://", "https://")):
            raise ConfigError(f"hf3fs: metadata_server_url={url!r} must start with http:// (from {source})")
        return cls(source=source, **kw)

    @classmethod
    def load(cls, extra: Mapping[str, Any]) -> Hf3fsConfig:
        if any(k in extra for k in KEYS):
            return cls.from_mapping(extra, "--hicache-storage-backend-extra-config")
        path = os.environ.get(CONFIG_PATH_ENV)
        if path:
            data = read_json_object(path, f"hf3fs: ${CONFIG_PATH_ENV}")
            missing = [k for k in ("file_path_prefix", "file_size", "numjobs", "entries") if k not in data]
            if missing:
                raise ConfigError(f"hf3fs: ${CONFIG_PATH_ENV} file {path!r} lacks {', '.join(missing)}")
            return cls.from_mapping(data, f"${CONFIG_PATH_ENV} file {path!r}")
        return cls()
