"""hf3fs configuration: the extra-config JSON, else the JSON file at ``$SGLANG_HICACHE_HF3FS_CONFIG_PATH``, else
single-machine defaults (SGLang's)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import attrs

from hicache_core.config import read_json_object
from hicache_core.errors import ConfigError
from hicache_core.storage.options import choice, option, parse_options, size, text, whole

CONFIG_PATH_ENV = "SGLANG_HICACHE_HF3FS_CONFIG_PATH"
KEYS = ("file_path_prefix", "file_size", "numjobs", "entries", "metadata_server_url")


def _url(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ConfigError(f"{what}={value!r} must be an http:// or https:// URL")
    return value


@attrs.frozen(kw_only=True)
class Hf3fsConfig:
    file_path_prefix: str = option("/data/hicache", text, "path prefix of the per-namespace files (on a 3FS mount)")
    file_size: int = option(1 << 40, size, "bytes per file (sparse; slots of one page + header)")
    numjobs: int = option(16, whole(1, 1024), "I/O threads per batch")
    entries: int = option(8, whole(1, 4096), "usrbio ring entries")
    metadata_server_url: Optional[str] = option(None, _url, "hicache-hf3fs-metadata URL (else in-process metadata)")
    metadata_auth_token: Optional[str] = option(
        None, text, "bearer token for the metadata server (else $HICACHE_HF3FS_METADATA_TOKEN)"
    )
    io_client: str = option("auto", choice("auto", "usrbio", "posix"), "usrbio when hf3fs_fuse imports, else POSIX")
    source: str = "defaults"

    def __attrs_post_init__(self) -> None:
        if self.file_size <= 0:
            raise ConfigError(f"hf3fs: file_size={self.file_size} must be > 0 (from {self.source})")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], source: str, **more: Any) -> Hf3fsConfig:
        return parse_options(cls, {**d, **more}, "hf3fs", where=source, source=source)

    @classmethod
    def load(cls, extra: Mapping[str, Any]) -> Hf3fsConfig:
        """The extra config when it names any file key; else the JSON file at $SGLANG_HICACHE_HF3FS_CONFIG_PATH
        (with the extra config's other keys on top); else the defaults."""
        source = "--hicache-storage-backend-extra-config"
        parse_options(cls, extra, "hf3fs", where=source)  # unknown keys and bad values fail here, whatever wins
        if any(k in extra for k in KEYS):
            return cls.from_mapping(extra, source)
        path = os.environ.get(CONFIG_PATH_ENV)
        if path:
            data = read_json_object(path, f"hf3fs: ${CONFIG_PATH_ENV}")
            missing = [k for k in ("file_path_prefix", "file_size", "numjobs", "entries") if k not in data]
            if missing:
                raise ConfigError(f"hf3fs: ${CONFIG_PATH_ENV} file {path!r} lacks {', '.join(missing)}")
            return cls.from_mapping(data, f"${CONFIG_PATH_ENV} file {path!r}", **extra)
        return cls.from_mapping(extra, "defaults")
